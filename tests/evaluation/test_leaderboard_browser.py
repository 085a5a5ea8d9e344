"""The HTML leaderboard in a real browser (headless Chromium): it renders, its plots load, its table
sorts (by a click's code path, from a shared `#sort=` link), and a screenshot is kept as a CI
artefact (`$PEFTKIT_ARTIFACTS`, else the test's tmp dir)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from peftkit.evaluation import leaderboard
from test_leaderboard import METHODS, SCORES, make_run

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium here (.ci/run installs Debian's chromium)")


def headless(*args: str, url: str, home: Path) -> subprocess.CompletedProcess:
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={home / 'profile'}", "--virtual-time-budget=3000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(home)})


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("board")
    for i, ((m, task, seed), score) in enumerate(SCORES.items()):
        make_run(root / "runs" / str(i), METHODS[m], task, seed, score, adapter_bytes=3000 if m == "lora" else 500)
    return leaderboard.run([root / "runs"], root / "out") / "leaderboard.html"


def rows_in_order(dom: str) -> list[str]:
    table = dom[dom.index('id="leaderboard"'):]
    table = table[: table.index("</table>")]
    return re.findall(r"<tr><td[^>]*>([^<]+)</td>", table)


def test_it_renders_with_its_plots_and_a_screenshot_is_kept(page, tmp_path):
    dom = headless("--dump-dom", url=page.as_uri(), home=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert rows_in_order(dom.stdout) == ["lora", "ia3"]  # best average first, as written
    assert 'id="warnings" class="failed"></p>' in dom.stdout  # every plot decoded (else the page names it)
    shots = Path(os.environ.get("PEFTKIT_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "leaderboard.png"
    r = headless(f"--screenshot={shot}", "--window-size=1200,1800", url=page.as_uri(), home=tmp_path)
    assert r.returncode == 0 and shot.stat().st_size > 20_000, r.stderr[-2000:]  # a page with a table and two plots, not a blank one

    from PIL import Image

    img = Image.open(shot).convert("L")
    assert sum(1 for n in img.histogram() if n) > 20  # plots' and text's shades, not one flat colour


def test_a_broken_plot_is_named_on_the_page(page, tmp_path):
    broken = tmp_path / "broken.html"
    html = page.read_text()
    broken.write_text(html.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    dom = headless("--dump-dom", url=broken.as_uri(), home=tmp_path)
    assert "plots that did not load: score_vs_params.png" in dom.stdout


@pytest.mark.parametrize("fragment, order", [("#sort=rte:asc", ["ia3", "lora"]), ("#sort=method", ["lora", "ia3"]),
                                             ("#sort=method:asc", ["ia3", "lora"]), ("#sort=adapter:asc", ["ia3", "lora"])])
def test_the_table_sorts(page, tmp_path, fragment, order):
    dom = headless("--dump-dom", url=page.as_uri() + fragment, home=tmp_path)
    assert rows_in_order(dom.stdout) == order
    column = fragment.split("=")[1].split(":")[0]
    assert f'data-sorted="{"asc" if ":asc" in fragment else "desc"}">{column}</th>' in dom.stdout
