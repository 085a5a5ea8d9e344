"""Many tasks, many adapters (issue 14's quality bar): on MiniLM and GLUE's four small tasks (CoLA,
MRPC, STS-B, RTE), single-task Houlsby adapters against one multi-task Houlsby run, HyperFormer
(one hypernetwork for every task and layer), AdapterFusion over the single-task adapters and one
multi-task MoE-LoRA, with trainable parameters per task.

Every cell is `peftkit train ...` as a user types it, in a fresh process:

  houlsby              recipe=glue_houlsby dataset=glue/<task>                         (one run per task)
  houlsby multi-task   recipe=glue_houlsby dataset=glue/small                          (one run)
  hyperformer          recipe=glue_houlsby method=hyperformer dataset=glue/small       (one run)
  adapter_fusion       recipe=glue method=adapter_fusion method.adapters=[the four single-task
                       Houlsby runs] dataset=glue/<task>                               (one run per task)
  moe_lora multi-task  recipe=glue method=moe_lora dataset=glue/small                  (one run)

All train `--epochs` epochs (default 2) on each task's first `--max-train-samples` rows (default
4,000: CoLA and STS-B are cut, MRPC and RTE whole; a CPU budget). A multi-task epoch has as many
batches as the tasks' own epochs together, so both sides take the same number of steps. fp32 (bf16
autocast ran 20x slower here), one thread per cell, `--jobs` cells at a time. A single-task run
keeps its best epoch per task; a multi-task run the epoch with the best average (its tasks cannot
stop apart). Parameters per task: a single-task row's own run; a multi-task row's run divided by
its tasks; AdapterFusion's own run plus one source adapter (four sources serve four fusions).

A finished cell is skipped, so an interrupted bench resumes. It prints the table, writes
`<out>/bench.json` and `<out>/results.md`.

Usage:
    .venv/bin/python scripts/multitask_bench.py [--out outputs/multitask_bench] [--jobs 2] [--epochs 2]
        [--max-train-samples 4000]
        [--rows houlsby,houlsby_mt,hyperformer,adapter_fusion,moe_lora] [--glue-dir ../shared/glue]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from glue_bench import finished  # a cell's report if it finished (ok or collapsed); scripts/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("cola", "mrpc", "stsb", "rte")
ROWS = {
    "houlsby": "Houlsby, single-task (m=64)",
    "houlsby_mt": "Houlsby, multi-task (m=64, T=2)",
    "hyperformer": "HyperFormer++, multi-task (T=2)",
    "adapter_fusion": "AdapterFusion over the single-task Houlsby adapters",
    "moe_lora": "MoE-LoRA, multi-task (T=2)",
}


def cells(row: str, out: Path) -> list[tuple[Path, list[str]]]:
    """(run dir, `peftkit train` arguments) of a row's cells."""
    if row == "houlsby":
        return [(out / row / t, ["recipe=glue_houlsby", f"dataset=glue/{t}"]) for t in TASKS]
    if row == "adapter_fusion":
        sources = ",".join(str(out / "houlsby" / t) for t in TASKS)
        return [(out / row / t, ["recipe=glue", "method=adapter_fusion", f"method.adapters=[{sources}]", f"dataset=glue/{t}"])
                for t in TASKS]
    method = {"houlsby_mt": ["recipe=glue_houlsby"], "hyperformer": ["recipe=glue_houlsby", "method=hyperformer"],
              "moe_lora": ["recipe=glue", "method=moe_lora"]}[row]
    return [(out / row / "small", [*method, "dataset=glue/small"])]


def run_cell(run_dir: Path, args: list[str], common: list[str]) -> dict:
    if (done := finished(run_dir)):
        print(f"skip {run_dir} (finished)", flush=True)
        return done
    cmd = [str(Path(sys.executable).parent / "peftkit"), "train", *args, *common, f"hydra.run.dir={run_dir}", "overwrite=true"]
    print("run ", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **_env()})
    if proc.returncode != 0:
        print(f"FAILED {run_dir} ({proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
        return {"status": "failed", "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
    print(f"done {run_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
    return finished(run_dir) or {"status": "failed"}


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def row_result(row: str, out: Path) -> dict | None:
    """Per-task scores, their average and trainable parameters per task, from the row's reports."""
    reports = [finished(d) for d, _ in cells(row, out)]
    if not all(reports):
        return None
    if len(reports) == 1:  # one multi-task run
        r = reports[0]
        scores, n_tasks = r["task_scores"], len(r["task_scores"])
        params, time_s = r["trainable_params"] / n_tasks, r["train_time_s"]
    else:
        scores = {t: r["score"] for t, r in zip(TASKS, reports)}
        params = statistics.fmean(r["trainable_params"] for r in reports)
        time_s = sum(r["train_time_s"] for r in reports)
        if row == "adapter_fusion":  # each fusion also needs its sources; each source serves every fusion
            params += statistics.fmean(finished(out / "houlsby" / t)["trainable_params"] for t in TASKS)
    return {"row": row, "label": ROWS[row], "scores": scores, "average": statistics.fmean(scores.values()),
            "params_per_task": round(params), "train_time_s": time_s}


def markdown(results: list[dict]) -> str:
    lines = ["| method | " + " | ".join(t.upper() if t != "stsb" else "STS-B" for t in TASKS) + " | **avg** | trainable params per task | train time (all tasks) |",
             "|---|" + "---|" * (len(TASKS) + 3)]
    for r in results:
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['scores'][t]:.2f}" for t in TASKS)
                     + f" | **{r['average']:.2f}** | {r['params_per_task']:,} | {r['train_time_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "multitask_bench")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-train-samples", type=int, default=4000)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--glue-dir", type=Path, default=ROOT.parent / "shared" / "glue")
    a = p.parse_args()
    rows = a.rows.split(",")
    common = [f"dataset.data_dir={a.glue_dir.resolve()}", f"trainer.epochs={a.epochs}",
              f"dataset.max_train_samples={a.max_train_samples}", "trainer.precision=fp32", "trainer.threads=1"]
    out = a.out.resolve()
    first = [r for r in rows if r != "adapter_fusion"]  # fusion reads the single-task runs: it goes last
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda c: run_cell(*c, common), [c for r in first for c in cells(r, out)]))
        if "adapter_fusion" in rows:
            list(pool.map(lambda c: run_cell(*c, common), cells("adapter_fusion", out)))
    results = [r for r in (row_result(row, out) for row in rows) if r]
    table = markdown(results)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"epochs": a.epochs, "max_train_samples": a.max_train_samples, "tasks": TASKS,
                                                "rows": results}, indent=2) + "\n")
    (out / "results.md").write_text(table)


if __name__ == "__main__":
    main()
