"""Gather finished runs (a sweep's cells) into one JSON: each run's settings, status, score and dev
score after every evaluation, so a docs table of a sweep has a file that holds its numbers.

    .venv/bin/python scripts/sweep_json.py --out docs/bench/method_sweep_issue17c.json outputs/sweep17c outputs/replaced/...

Each argument is a run directory (config.yaml + eval/report.json) or a folder searched for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf


def runs(paths: list[Path]) -> list[Path]:
    found = []
    for p in paths:
        found += [p] if (p / "eval" / "report.json").is_file() else sorted(r.parent.parent for r in p.rglob("eval/report.json"))
    return found


def cell(run_dir: Path) -> dict:
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    cfg = OmegaConf.load(run_dir / "config.yaml")
    log = run_dir / "train_log.jsonl"
    evals = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    method = {k: v for k, v in OmegaConf.to_container(cfg.method).items() if k != "lr"}
    return {"method": method, "lr": cfg.trainer.lr, "epochs": cfg.trainer.epochs, "task": report.get("task"),
            "status": report["status"], "score": report["score"],
            "dev_after_each_eval": [round(e["score"], 2) for e in evals if "score" in e],
            "trainable_params": report.get("trainable_params"), "train_time_s": report.get("train_time_s")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("paths", type=Path, nargs="+")
    args = p.parse_args(argv)
    if args.out.exists():
        sys.exit(f"{args.out} exists; pass another --out or remove it first")
    cells = {str(d): cell(d) for d in runs(args.paths)}
    if not cells:
        sys.exit("no finished run (config.yaml + eval/report.json) under the paths given")
    for name, c in cells.items():
        print(f"{c['status']:9s} {c['score']:6.2f}  lr {c['lr']:<7g} {name}  {c['dev_after_each_eval']}")
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"argv": sys.argv[1:], "cells": cells}, indent=1) + "\n")
    tmp.replace(args.out)  # atomic: no half-written JSON
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
