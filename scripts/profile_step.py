"""Where a training step's time goes: torch's profiler over a few peftkit steps, ops by self CPU time.

Two steps it knows, each built with peftkit's own recipe, task and model code:
  cls  LoRA r=8 q,v on MiniLM, SST-2 (glue_lora), length-grouped batches of 32
  lm   LoRA r=8 q,k,v,o on SmolLM2-135M-Instruct (sft_lora), 3 packed rows of up to 512 GSM8K tokens

    .venv/bin/python scripts/profile_step.py cls --glue-dir ../shared/glue [--threads 2] [--json out.json]
    .venv/bin/python scripts/profile_step.py lm --math-dir ../shared/llm/math [--threads 1]

It prints the step's throughput without the profiler, then the top ops with their share of the
profiled time; `--json` writes both. `--compile` runs the model through `torch.compile(dynamic=True)`
(inductor) and also reports how long the warm-up steps took, which is where it compiles: compare
with the same command without it (the same batches are timed either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftkit import backbone, config, cpu, model, tasks  # noqa: E402
from peftkit.data.batching import train_batches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 8


def build(part: str, data_dir: str):
    if part == "cls":
        cfg = config.compose("glue_lora", ["dataset=glue/sst2", f"dataset.data_dir={data_dir}", "dataset.max_train_samples=8000"])
    else:
        cfg = config.compose("sft_lora", [f"dataset.data_dir={data_dir}", "dataset.max_train_samples=48"])
    kind = tasks.of(cfg.dataset)
    data = kind.load_data(cfg.dataset)
    a = model.build(cfg.backbone, cfg.method, getattr(data, "label_names", None), kind.NAME)
    if hasattr(kind, "skip_unread_positions"):  # as peftkit's trainer does (train.prepare_model)
        kind.skip_unread_positions(a.model, a.method)
    train = kind.encode(data, a.tokenizer, cfg)["train"]
    batches = train_batches(train.lengths, 32 if part == "cls" else 3, 0, 0, True)
    return kind, a.model, train, batches, a.trainable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("cls", "lm"))
    p.add_argument("--glue-dir", default=str(ROOT.parent / "shared" / "glue"))
    p.add_argument("--math-dir", default=str(ROOT.parent / "shared" / "llm" / "math"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--steps", type=int, default=None, help="steps timed and profiled (default: 20 cls, 1 lm)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (dynamic shapes) before the warm-up steps")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: the forward under CPU autocast, as trainer.precision=bf16 runs it")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (20 if args.part == "cls" else 1)
    kind, net, train, batches, trainable = build(args.part, args.glue_dir if args.part == "cls" else args.math_dir)
    net.train()
    cpu.use_fast_dropout(net)  # as peftkit's trainer does on CPU
    if args.precision == "bf16":
        backbone.store_frozen_base(net, torch.bfloat16, trainable)  # as peftkit's trainer does under bf16 autocast
    opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-4)
    if args.compile:
        net = torch.compile(net, dynamic=True)
    unit = "samples" if args.part == "cls" else "tokens"

    def step(b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = kind.loss(net, train.batch(b), train)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def size(b):
        return len(b) if unit == "samples" else sum(train.lengths[i] for i in b)

    w = min(WARMUP_STEPS, len(batches) - 2 * steps)  # enough batch shapes for a dynamic-shape compile to settle
    if w < 1:
        sys.exit(f"{len(batches)} batches: too few for a warm-up step and 2 x --steps {steps}")
    warm, timed, profiled = batches[:w], batches[w : w + steps], batches[w + steps : w + 2 * steps]
    t0 = time.perf_counter()
    for b in warm:
        step(b)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in timed:
        step(b)
    seconds = time.perf_counter() - t0
    speed = sum(size(b) for b in timed) / seconds

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in profiled:
            step(b)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    top = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total, "calls": e.count}
           for e in ops[: args.top]]
    print(f"{args.part}{' compiled' if args.compile else ''}: {speed:.1f} {unit}/s over {steps} steps "
          f"({seconds / steps:.2f} s a step, {torch.get_num_threads()} threads) after {w} warm-up steps in {warmup_s:.1f} s; "
          f"profiled {total / 1e6:.2f} s over {steps} more")
    for t in top:
        print(f"  {t['share'] * 100:5.1f}%  {t['self_s']:7.2f} s  {t['calls']:6d}  {t['op']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"part": args.part, "compile": args.compile, "precision": args.precision, f"{unit}_per_s": speed,
                                               "threads": torch.get_num_threads(), "steps": steps, "warmup_steps": w,
                                               "warmup_s": warmup_s, "profiled_s": total / 1e6, "top": top}, indent=2) + "\n")


if __name__ == "__main__":
    main()
