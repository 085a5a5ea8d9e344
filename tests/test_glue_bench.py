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
    assert (out / "leaderboard" / "scores.png").is_file()
    assert "| lora | `glue_lora`, lr 1e-3, 1 ep |" in (out / "results.md").read_text()  # the grid table: the recipe it trained

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


def load_glue_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("glue_bench", ROOT / "scripts" / "glue_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_table_gives_each_row_its_recipe_gap_and_verdict(tmp_path):
    """The docs' grid table: the recipe each row trained (from its cells' configs), the gap to full
    fine-tuning with met / MISS / excepted, and a partial row's task count instead of an average."""
    gb = load_glue_bench()
    tasks = ["cola", "rte"]

    def row(method, scores, lr, epochs):
        run = tmp_path / method / "cola"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"trainer:\n  lr: {lr}\n  epochs: {epochs}\n")
        cells = {t: {"mean": s, "std": None, "n": 1, "runs": [str(run)], "optimistic": 1, "collapsed": 0}
                 for t, s in zip(tasks, scores)}
        return {"label": method, "method": method, "scores": cells, "average": sum(scores) / len(scores),
                "tasks_scored": len(scores), "trainable_params": 1000, "train_time_s": 12.0, "runs": [str(run)]}

    board = {"tasks": tasks, "rows": [row("full", [60.0, 70.0], 5e-5, 3), row("lora", [60.0, 69.0], 1e-3, 6),
                                      row("vera", [50.0, 60.0], 1e-2, 6), row("head", [10.0, 50.0], 1e-2, 6),
                                      row("loreft", [20.0], 3e-3, 20)]}
    lines = {line.split(" | ")[0].lstrip("| "): line for line in gb.grid_table(board).splitlines()}
    assert lines["full"].startswith("| full | `glue_full`, lr 5e-5, 3 ep | 60.00 | 70.00 | **65.00** |  |")
    assert "| `glue_lora`, lr 1e-3, 6 ep |" in lines["lora"] and "| −0.50, met |" in lines["lora"]
    assert "| `glue`, lr 1e-2, 6 ep |" in lines["vera"] and "| −10.00, **MISS** |" in lines["vera"]
    assert "| −35.00, excepted |" in lines["head"]
    assert "| `glue_loreft`, lr 3e-3, 20 ep | 20.00 | – | 1 of 2 |  |" in lines["loreft"]
