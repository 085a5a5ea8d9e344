"""scripts/glue_bench.py end to end, on a tiny BERT and a 24-row RTE written here: each cell is a
`peftkit train` or a peft + Trainer process, a rerun skips the finished cells, a retuned recipe
reruns them, `--start-cells-for 0` starts none, `--keep` carries finished cells to a fresh `--out`,
and the targets land in bench.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the cat sat on the mat", "a dog ran in the park", "it rained all day long", "she reads a book at night"]


def write_rte(root: Path) -> Path:
    for split, n in (("train", 24), ("dev", 8)):
        rows = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            label = ("entailment", "not_entailment")[i % 2]
            rows.append(f"{i}\t{WORDS[i % 4]} number {i}\t{WORDS[(i + i % 2) % 4]}\t{label}")
        (root / "RTE").mkdir(parents=True, exist_ok=True)
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def bench(out: Path, glue: Path, backbone: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "glue_bench.py"), "--out", str(out), "--glue-dir", str(glue),
           "--methods", "lora", "--tasks", "rte", "--sides", "peftkit,peer", "--jobs", "2", "--threads", "1",
           "--override", f"backbone.path={backbone}", "--override", "trainer.epochs=1", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cells_run_resume_and_report(tiny_bert, tmp_path):
    glue, out, kept = write_rte(tmp_path / "glue"), tmp_path / "grid", tmp_path / "kept"
    proc = bench(out, glue, tiny_bert, "--keep", str(kept))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 cells, 0 already finished, 2 to run" in proc.stdout
    for side, method in (("peftkit", "lora"), ("peer", "lora")):
        report = json.loads((out / side / method / "rte" / "eval" / "report.json").read_text())
        assert report["status"] in ("ok", "collapsed") and 0 <= report["score"] <= 100, (side, method)
    summary = json.loads((out / "bench.json").read_text())
    checks = {c["check"] for c in summary["checks"]}
    assert checks == {"lora >= lora · peft+Trainer"}  # no full fine-tuning row here: no gap to it
    assert (out / "results.md").is_file() and (out / "leaderboard" / "scores.png").is_file()

    # another machine: only the kept files (no adapters), and the same command resumes from them
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
        "peer/lora/rte/config.yaml", "peer/lora/rte/eval/report.json",
        "peftkit/lora/rte/config.yaml", "peftkit/lora/rte/eval/report.json"]
    elsewhere = bench(tmp_path / "elsewhere", glue, tiny_bert, "--keep", str(kept), "--start-cells-for", "0")
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert "2 finished cells restored from" in elsewhere.stdout and "2 cells, 2 already finished, 0 to run" in elsewhere.stdout
    board = json.loads((tmp_path / "elsewhere" / "leaderboard" / "leaderboard.json").read_text())
    sizes = {r["label"]: r["adapter_bytes"] for r in board["rows"]}
    on_disk = sum(f.stat().st_size for f in (out / "peftkit" / "lora" / "rte" / "adapter").rglob("*") if f.is_file())
    assert sizes["lora"] == on_disk > 0 and sizes["lora · peft+Trainer"] > 0  # as recorded, the adapters stayed behind

    retuned = bench(out, glue, tiny_bert, "--override", "trainer.lr=0.002", "--start-cells-for", "0")
    assert retuned.returncode == 0, retuned.stderr[-3000:]
    assert "2 cells, 0 already finished, 2 to run" in retuned.stdout  # a changed recipe reruns its cells
    assert "--start-cells-for 0 ran out with 2 cells to go" in retuned.stdout
    assert json.loads((out / "peftkit" / "lora" / "rte" / "eval" / "report.json").read_text())["status"] in ("ok", "collapsed")
