"""Checkpoint merging (MWA) against its baselines: LoRA on MiniLM, one GLUE task, one training run.

1. Train `recipe=glue_lora` (backbone minilm) on `--task` (default MRPC) from `--glue-dir` with
   `trainer.keep_checkpoints=--keep` (default 5) and an evaluation every half epoch (`--eval-every`
   to change it). keep_best stays on, as in the recipe, so the run's adapter/ is the best single
   checkpoint of all its evaluations.
2. Merge the kept snapshots with `peftkit merge mode=mwa`: `last` (the newest snapshot alone),
   `uniform`, and `loss` and `step` weighting at each of `--penalties` (default 1 and 3).
3. Score every merge on dev with `peftkit.evaluate.run`, which is what `peftkit eval run=OUT` does.

Both "best" rows are picked on dev itself (the best of every evaluation, and the best of the kept
snapshots), so they are optimistic; the merges use only training loss and step.

Prints a table and writes `<out>/results.json` and `<out>/results.md`; the run is `<out>/run`, the
merges `<out>/merges/<name>`. `--skip-train` merges and scores an existing `<out>/run` again.

Usage:
    .venv/bin/python scripts/mwa_bench.py [--task mrpc] [--keep 5] [--penalties 1,3] [--eval-every N]
        [--threads 1] [--out outputs/mwa_bench] [--glue-dir ../shared/glue] [--skip-train]
    smoke test on a tiny model: add --backbone-path DIR --max-steps 8 --eval-every 2
        --max-train-samples 128 --max-eval-samples 64
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GLUE = ROOT.parent / "shared" / "glue"
TASKS = ("cola", "sst2", "mrpc", "stsb", "rte")


def train_overrides(args) -> list[str]:
    out = [f"dataset=glue/{args.task}", f"dataset.data_dir={args.glue_dir}", f"trainer.keep_checkpoints={args.keep}"]
    if args.threads:
        out.append(f"trainer.threads={args.threads}")
    if args.backbone_path:
        out.append(f"backbone.path={args.backbone_path}")
    if args.max_steps:
        out.append(f"trainer.max_steps={args.max_steps}")
    if args.max_train_samples:
        out.append(f"dataset.max_train_samples={args.max_train_samples}")
    if args.max_eval_samples:
        out.append(f"dataset.max_eval_samples={args.max_eval_samples}")
    return out


def half_epoch(cfg) -> int:
    """Optimizer steps in half an epoch (one process, the recipe's batch size and accumulation)."""
    from peftkit import data

    n = len(data.load(cfg.dataset, splits=("train",)).splits["train"])
    steps_per_epoch = math.ceil(n / cfg.trainer.batch_size) // cfg.trainer.grad_accum
    return max(1, steps_per_epoch // 2)


def train_run(args, run_dir: Path) -> None:
    from peftkit import config, train

    cfg = config.compose("glue_lora", train_overrides(args))
    cfg.trainer.eval_every = args.eval_every or half_epoch(cfg)
    shutil.rmtree(run_dir, ignore_errors=True)
    train.run(cfg, run_dir)


def merges(penalties: list[float]) -> list[tuple[str, str, float]]:
    """(row name, weighting, penalty) of every merge the bench makes."""
    rows = [("last", "last", 0.0), ("uniform", "uniform", 0.0)]
    return rows + [(f"{w} p={p:g}", w, p) for w in ("loss", "step") for p in penalties]


def merge_and_score(run_dir: Path, out: Path, weighting: str, penalty: float) -> dict:
    from peftkit import config, evaluate, merge

    info = merge.run(config.compose_merge("mwa", [f"run={run_dir}", f"weighting={weighting}", f"penalty={penalty}",
                                                  f"out={out}"]))
    result = evaluate.run(out, "validation", {})
    return {"score": result["score"], "metrics": result["metrics"], "weights": [c["weight"] for c in info["checkpoints"]],
            "checkpoints": info["checkpoints"]}


def flat_metrics(metrics: dict) -> dict[str, float]:
    return {(k if len(metrics) == 1 else f"{split}/{k}"): v for split, ms in metrics.items() for k, v in ms.items()}


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Column names and formatted cells shared by the console table and the Markdown one."""
    metric_names = list(flat_metrics(rows[0]["metrics"]))
    head = ["row", "dev score", *metric_names, "weights (oldest → newest)"]
    cells = []
    for r in rows:
        ms = flat_metrics(r["metrics"])
        weights = " ".join(f"{w:.3f}" for w in r["weights"]) if r.get("weights") else r.get("note", "")
        cells.append([r["name"], f"{r['score']:.2f}", *[f"{ms.get(m, float('nan')):.2f}" for m in metric_names], weights])
    return head, cells


def results_markdown(summary: dict) -> str:
    head, cells = table_rows(summary["rows"])
    snaps = summary["snapshots"]
    lines = [
        f"Command: `{' '.join(['.venv/bin/python', 'scripts/mwa_bench.py', *summary['argv']])}`",
        "",
        (f"LoRA (recipe glue_lora) on {summary['backbone']}, {summary['task']}: {summary['total_steps']} steps, "
        f"an evaluation every {summary['eval_every']}, the last {summary['keep']} kept "
        f"(steps {', '.join(str(s['step']) for s in snaps)}). Dev scores; the two best rows are chosen on dev."),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *["| " + " | ".join(c) + " |" for c in cells],
        "",
        "| kept snapshot step | train loss since the previous | dev score at training |",
        "|---|---|---|",
        *[f"| {s['step']} | {s['train_loss']:.4f} | {s['score']:.2f} |" for s in snaps],
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="mrpc")
    p.add_argument("--glue-dir", type=Path, default=DEFAULT_GLUE)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "mwa_bench")
    p.add_argument("--keep", type=int, default=5, help="snapshots kept: trainer.keep_checkpoints (default 5)")
    p.add_argument("--penalties", default="1,3", help="comma-separated MWA penalties for loss and step weighting")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: half an epoch)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--backbone-path", type=Path, help="a local model folder instead of MiniLM (smoke tests)")
    p.add_argument("--max-steps", type=int, help="stop training after N steps (smoke tests)")
    p.add_argument("--max-train-samples", type=int, help="first N training rows (smoke tests)")
    p.add_argument("--max-eval-samples", type=int, help="first N dev rows (smoke tests)")
    p.add_argument("--skip-train", action="store_true", help="merge and score the existing <out>/run again")
    args = p.parse_args(argv)
    args.glue_dir, args.out = args.glue_dir.resolve(), args.out.resolve()
    if args.backbone_path:
        args.backbone_path = args.backbone_path.resolve()
    try:
        penalties = [float(x) for x in args.penalties.split(",") if x]
    except ValueError:
        p.error(f"--penalties takes numbers separated by commas, got '{args.penalties}'")
    if args.keep < 1:
        p.error("--keep must be at least 1")
    if not args.skip_train and not (args.glue_dir / "MRPC").is_dir():
        p.error(f"no GLUE TSVs under {args.glue_dir}; pass --glue-dir")

    from omegaconf import OmegaConf

    from peftkit.merge import checkpoints

    run_dir = args.out / "run"
    if not args.skip_train:
        train_run(args, run_dir)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    cfg = OmegaConf.load(run_dir / "config.yaml")
    snaps = [{"step": s.step, "train_loss": s.meta["train_loss"], "score": s.meta["score"],
              "metrics": s.meta["metrics"]} for s in checkpoints.read_snapshots(run_dir, None)]
    best_snap = max(snaps, key=lambda s: s["score"])
    rows = [{"name": f"best checkpoint (keep_best, step {report['best_step']})", "score": report["score"],
             "metrics": report["metrics"], "note": "chosen on dev"},
            {"name": f"best kept snapshot (step {best_snap['step']})", "score": best_snap["score"],
             "metrics": best_snap["metrics"], "note": "chosen on dev"}]
    for name, weighting, penalty in merges(penalties):
        rows.append({"name": name, "weighting": weighting, "penalty": penalty,
                     **merge_and_score(run_dir, args.out / "merges" / name.replace(" ", "_").replace("=", ""), weighting, penalty)})

    backbone = cfg.backbone.name + (f" ({cfg.backbone.path})" if cfg.backbone.path else "")
    summary = {"task": cfg.dataset.name, "backbone": backbone, "total_steps": report["total_steps"],
               "eval_every": cfg.trainer.eval_every, "keep": cfg.trainer.keep_checkpoints, "train_time_s": report["train_time_s"], "snapshots": snaps, "rows": rows, "argv": sys.argv[1:] if argv is None else argv}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "results.md").write_text(results_markdown(summary))

    from rich.console import Console
    from rich.table import Table

    head, cells = table_rows(rows)
    table = Table(title=f"MWA on {cfg.dataset.name}: {len(snaps)} kept snapshots of {report['total_steps']} steps", title_justify="left")
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i in (0, len(head) - 1) else "right")
    for c in cells:
        table.add_row(*c)
    Console().print(table)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
