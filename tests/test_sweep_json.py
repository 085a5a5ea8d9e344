"""scripts/sweep_json.py: a sweep's run directories into one JSON, never replacing an existing file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_run(d: Path, lr: float, scores: list[float], status: str) -> None:
    (d / "eval").mkdir(parents=True)
    (d / "config.yaml").write_text(f"method:\n  name: lora\n  r: 8\n  lr: 1e-3\ntrainer:\n  lr: {lr}\n  epochs: 2\n")
    (d / "eval" / "report.json").write_text(json.dumps({"status": status, "score": max(scores), "task": "cola",
                                                         "trainable_params": 10, "train_time_s": 1.0}))
    lines = [{"step": 1, "loss": 0.7}] + [{"step": 2 + i, "score": s} for i, s in enumerate(scores)]
    (d / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep_json.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_gathers_each_run_and_refuses_to_replace(tmp_path):
    make_run(tmp_path / "sweep" / "a" / "cola", 3e-3, [0.0, 12.345], "ok")
    make_run(tmp_path / "one", 1e-2, [0.0, 0.0], "collapsed")
    out = tmp_path / "sweep.json"
    r = run("--out", out, tmp_path / "sweep", tmp_path / "one")
    assert r.returncode == 0, r.stderr
    cells = json.loads(out.read_text())["cells"]
    a, one = cells[str(tmp_path / "sweep" / "a" / "cola")], cells[str(tmp_path / "one")]
    assert (a["lr"], a["status"], a["dev_after_each_eval"], a["method"]) == (3e-3, "ok", [0.0, 12.35], {"name": "lora", "r": 8})
    assert (one["status"], one["score"]) == ("collapsed", 0.0)
    before = out.read_text()
    again = run("--out", out, tmp_path / "one")
    assert again.returncode != 0 and "exists" in again.stderr and out.read_text() == before
