"""ComPEFT on a trained run: adapter size and dev score at several densities and alphas.

Each variant is `peftkit merge mode=compress` run in-process into OUT/d<density>_a<alpha>/ and scored
on dev in-process with `peftkit.evaluate.run`; the uncompressed adapter is scored the same way from
a copy in OUT/uncompressed/ (the given run is never written to). The table: density, alpha, bytes
(tensor data: masks, signs, scales, dense buffers), file bytes (the safetensors file, header
included), ratio (tensor bytes), relative error ‖τ̃ − τ‖/‖τ‖, dev score and its change from the
uncompressed score. Written to OUT/results.json and OUT/results.md.

Usage:
    .venv/bin/python scripts/compeft_bench.py --run outputs/2026-11-25/10-00-00      # any trained run
    .venv/bin/python scripts/compeft_bench.py --train --task mrpc                     # train glue_lora first
        [--recipe glue_lora] [--glue-dir ../shared/glue] [--set KEY=VALUE ...]     # --set: more train overrides
        [--densities 0.05 0.1 0.2 0.5] [--alphas 1.0] [--scale mean|std] [--out outputs/compeft_bench]
With --train the run goes to OUT/train/ and is reused if it finished (eval/report.json says ok).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console()


def train(args) -> Path:
    run = args.out / "train"
    report = run / "eval" / "report.json"
    if report.is_file() and json.loads(report.read_text()).get("status") == "ok":
        console.print(f"reusing the finished run {run}")
        return run
    cmd = [sys.executable, "-m", "peftkit.cli", "train", f"recipe={args.recipe}", f"dataset=glue/{args.task}",
           f"dataset.data_dir={args.glue_dir.resolve()}", f"hydra.run.dir={run.resolve()}", *args.set]
    console.print(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True, cwd=ROOT)
    return run


def copy_run(run: Path, dest: Path) -> Path:
    """config.yaml, adapter/ and eval/report.json of `run`: scoring the copy leaves `run` as it was."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy(run / "config.yaml", dest / "config.yaml")
    shutil.copytree(run / "adapter", dest / "adapter")
    if (run / "eval" / "report.json").is_file():
        (dest / "eval").mkdir()
        shutil.copy(run / "eval" / "report.json", dest / "eval" / "report.json")
    return dest


def score(run_dir: Path, source: Path) -> dict:
    """Dev metrics and score of the adapter in `run_dir`, in-process.

    The source's report.json goes beside it first, so the new report says which run the adapter
    came from (dataset, method, trainable params) and `peftkit eval` shows the source's scores
    next to the new ones; the scores written are the new ones.
    """
    from peftkit import evaluate

    if (source / "eval" / "report.json").is_file():
        (run_dir / "eval").mkdir(exist_ok=True)
        shutil.copy(source / "eval" / "report.json", run_dir / "eval" / "report.json")
    result = evaluate.run(run_dir, "validation", {})
    return {"score": result["score"], "metrics": result["metrics"]}


def compress(run: Path, out: Path, density: float, alpha: float, scale: str) -> dict:
    from peftkit import config, merge

    return merge.run(config.compose_merge("compress", [f"adapter={run.resolve()}", f"density={density}", f"alpha={alpha}",
                                                        f"scale={scale}", f"out={out.resolve()}"]))


def markdown(res: dict) -> str:
    lines = [f"# ComPEFT: {res['method']} on {res['dataset']} ({res['backbone']})", "",
             f"Run: `{res['run']}` · scale: {res['scale']} · uncompressed dev score {res['uncompressed']['score']:.2f}", "",
             "| density | alpha | bytes | file bytes | ratio | relative error | dev score | vs uncompressed |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    u = res["uncompressed"]
    lines.append(f"| uncompressed | – | {u['bytes']:,} | {u['file_bytes']:,} | 1.0× | 0 | {u['score']:.2f} | – |")
    for r in res["rows"]:
        lines.append(f"| {r['density']:g} | {r['alpha']:g} | {r['bytes']:,} | {r['file_bytes']:,} | {r['ratio']:.1f}× | "
                     f"{r['relative_error']:.3f} | {r['score']:.2f} | {r['delta']:+.2f} |")
    lines += ["", ("bytes: tensor data (bit-packed masks and signs, one float32 scale per tensor, dense buffers); "
                   "file bytes: the safetensors file, header included. Ratio: of tensor bytes."),
              f"Time: {res['time_s']:.0f} s.", ""]
    return "\n".join(lines)


def show(res: dict) -> None:
    table = Table(title=f"ComPEFT · {res['method']} on {res['dataset']} · scale {res['scale']}", title_justify="left")
    for col in ("density", "alpha", "bytes", "file bytes", "ratio", "rel. error", "dev score", "Δ score"):
        table.add_column(col, justify="right")
    u = res["uncompressed"]
    table.add_row("dense", "–", f"{u['bytes']:,}", f"{u['file_bytes']:,}", "1.0×", "0", f"{u['score']:.2f}", "–")
    for r in res["rows"]:
        table.add_row(f"{r['density']:g}", f"{r['alpha']:g}", f"{r['bytes']:,}", f"{r['file_bytes']:,}", f"{r['ratio']:.1f}×",
                      f"{r['relative_error']:.3f}", f"{r['score']:.2f}", f"{r['delta']:+.2f}")
    console.print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a trained run directory (config.yaml, adapter/)")
    src.add_argument("--train", action="store_true", help="train --recipe on --task first (into OUT/train)")
    p.add_argument("--task", default="mrpc")
    p.add_argument("--recipe", default="glue_lora")
    p.add_argument("--glue-dir", type=Path, default=ROOT.parent / "shared" / "glue")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for --train")
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0])
    p.add_argument("--scale", choices=("mean", "std"), default="mean")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "compeft_bench")
    args = p.parse_args()

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    run = train(args) if args.train else args.run
    from peftkit import adapter

    meta = adapter.read_config(run / "adapter")
    dense = score(copy_run(run, args.out / "uncompressed"), run)
    weights = run / "adapter" / adapter.WEIGHTS
    from safetensors.torch import load_file

    dense_bytes = sum(t.numel() * t.element_size() for t in load_file(str(weights)).values())
    rows = []
    for density in args.densities:
        for alpha in args.alphas:
            out = args.out / f"d{density:g}_a{alpha:g}"
            info = compress(run, out, density, alpha, args.scale)
            s = score(out, run)
            rows.append({"density": density, "alpha": alpha, "bytes": info["compressed_bytes"],
                         "file_bytes": info["compressed_file_bytes"], "ratio": info["ratio"],
                         "relative_error": info["relative_error"], **s, "delta": s["score"] - dense["score"], "dir": str(out)})
    res = {"run": str(run.resolve()), "method": meta["method"]["name"], "dataset": meta.get("dataset"),
           "backbone": meta["backbone"]["name"], "scale": args.scale,
           "uncompressed": {"bytes": dense_bytes, "file_bytes": weights.stat().st_size, **dense},
           "rows": rows, "time_s": time.perf_counter() - t0}
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(res))
    show(res)
    console.print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
