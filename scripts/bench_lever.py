"""One speed lever on and off: the same training steps, the two settings interleaved in one process
(the order alternating by round), so the machine's drift falls on both alike.

    .venv/bin/python scripts/bench_lever.py first_position --rounds 6 --steps 40 --json out.json
    .venv/bin/python scripts/bench_lever.py dropout --rounds 6 --steps 30
    .venv/bin/python scripts/bench_lever.py low_rank --rounds 6 --steps 30
    .venv/bin/python scripts/bench_lever.py no_dropout --rounds 6 --steps 30
    .venv/bin/python scripts/bench_lever.py short_attention --rounds 6 --steps 4
    .venv/bin/python scripts/bench_lever.py fused_head --rounds 6 --steps 4 [--memory]
    .venv/bin/python scripts/bench_lever.py packed --rounds 10 --steps 40 [--memory]

The levers, each on the step that `scripts/profile_step.py` builds with peftkit's own recipe, task and
model code (fast CPU dropout, the frozen base stored in bf16 under `--precision bf16`, as the trainer):
  first_position   cls: the classifier's last layer on the first position only
                   (`tasks.classification.skip_unread_positions`) against the whole layer
  dropout          cls: peftkit's CPU dropout (`cpu.fast_dropout`: only the dropped positions drawn)
                   against torch's own (`nn.functional.dropout`: a Bernoulli mask), in every
                   dropout of the step (hidden, attention probabilities, LoRA's input)
  low_rank         cls: each LoRA layer as one autograd node (`methods.lora.low_rank_linear`)
                   against the base Linear's call, then the low-rank product scaled and added
  no_dropout       cls: every dropout of the step skipped (its input passed on as it is) against
                   peftkit's CPU dropout: not a lever to use (it changes the recipe) but what
                   dropout still costs a step, the most a faster dropout could save
  short_attention  lm: packed examples of up to `causal_lm.SHORT_EXAMPLE` tokens attended by
                   `causal_lm.short_causal_attention` against the flash kernel (SDPA)
  fused_head       lm: the LM head fused with the loss (`causal_lm.head_cross_entropy`) against the
                   head's logits and then the loss
  packed           cls (bf16 only): the frozen Linears on weights packed once
                   (`methods.base.PackedLinear`, LoRA's base included) against plain `nn.Linear`s

Each round runs `--steps` batches with the lever off and the same batches with it on; it prints the
throughput of each and their ratio, then the median ratio. `--memory` instead runs each side alone in
a fresh process over every batch of the split and prints its peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import profile_step  # noqa: E402
from peftkit import backbone, cpu  # noqa: E402
from peftkit.files import atomic_write_json  # noqa: E402
from peftkit.methods.base import PackedLinear, pack_frozen_linears  # noqa: E402
from peftkit.methods import lora  # noqa: E402
from peftkit.tasks import causal_lm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PART = {"first_position": "cls", "dropout": "cls", "low_rank": "cls", "no_dropout": "cls", "short_attention": "lm", "fused_head": "lm",
        "packed": "cls"}


def switch(lever: str, net):
    """A function that turns the lever on (True) or off (False) on this model."""
    if lever == "first_position":
        last = net.base_model.encoder.layer[-1]
        on_class = type(last)
        if not on_class.__name__.startswith("FirstPosition"):
            raise SystemExit("the first-position shortcut does not apply to this model")
        off_class = on_class.__mro__[1]
        return lambda on: setattr(last, "__class__", on_class if on else off_class)
    if lever == "dropout":
        fast, torch_own = cpu.fast_dropout, lambda x, p: torch.nn.functional.dropout(x, p, training=True)
        return lambda on: setattr(cpu, "fast_dropout", fast if on else torch_own)
    if lever == "no_dropout":
        fast = cpu.fast_dropout
        return lambda on: setattr(cpu, "fast_dropout", (lambda x, p: x) if on else fast)
    if lever == "low_rank":
        fusable = lora.fusable
        return lambda on: setattr(lora, "fusable", fusable if on else (lambda base: False))
    if lever == "short_attention":
        length = causal_lm.SHORT_EXAMPLE
        return lambda on: setattr(causal_lm, "SHORT_EXAMPLE", length if on else 0)
    if lever == "packed":
        packed = [m for m in net.modules() if type(m) is PackedLinear]
        if not packed:
            raise SystemExit("no packed Linears: the packed lever needs --precision bf16 and a torch with oneDNN")

        def turn(on):
            for m in packed:
                m.__class__ = PackedLinear if on else torch.nn.Linear
        return turn
    fused = causal_lm.fused_head_inputs
    return lambda on: setattr(causal_lm, "fused_head_inputs", fused if on else (lambda *a: None))


def memory(args) -> None:
    rows = {}
    for side in ("off", "on"):
        cmd = [sys.executable, __file__, args.lever, "--side", side, f"--precision={args.precision}",
               f"--threads={args.threads}", f"--glue-dir={args.glue_dir}", f"--math-dir={args.math_dir}"]
        rows[side] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"{args.lever} {side}: peak RSS {rows[side]['peak_rss_mb']:.0f} MB over {rows[side]['steps']} steps")
    print(f"on / off: {rows['on']['peak_rss_mb'] / rows['off']['peak_rss_mb']:.3f}")
    if args.json:
        atomic_write_json(Path(args.json), {"lever": args.lever, "precision": args.precision, "threads": args.threads,
                                            "memory": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lever", choices=tuple(PART))
    p.add_argument("--glue-dir", default=str(ROOT.parent / "shared" / "glue"))
    p.add_argument("--math-dir", default=str(ROOT.parent / "shared" / "llm" / "math"))
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=None, help="batches a round (default: 40 cls, 4 lm)")
    p.add_argument("--memory", action="store_true", help="peak RSS of each side alone, each in its own process")
    p.add_argument("--side", choices=("on", "off"), default=None, help=argparse.SUPPRESS)  # --memory's children
    p.add_argument("--json", default=None)
    args = p.parse_args()
    part = PART[args.lever]
    if args.memory:
        return memory(args)
    torch.set_num_threads(args.threads)
    kind, net, train, batches, trainable = profile_step.build(part, args.glue_dir if part == "cls" else args.math_dir)
    net.train()
    cpu.use_fast_dropout(net)
    bf16 = args.precision == "bf16"
    if bf16:
        backbone.store_frozen_base(net, torch.bfloat16, trainable)
        pack_frozen_linears(net)  # as the trainer on CPU under bf16
    opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-4, fused=True)  # as the trainer's
    turn = switch(args.lever, net)
    unit = "samples" if part == "cls" else "tokens"

    def run(steps) -> float:
        t0 = time.perf_counter()
        for b in steps:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = kind.loss(net, train.batch(b), train)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return sum(len(b) if unit == "samples" else sum(train.lengths[i] for i in b) for b in steps) / (time.perf_counter() - t0)

    if args.side:
        turn(args.side == "on")
        run(batches)
        print(json.dumps({"steps": len(batches), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    steps = batches[: args.steps or (40 if part == "cls" else 4)]
    for on in (False, True):  # warm-up
        turn(on)
        run(steps[:2])
    rounds = []
    for r in range(args.rounds):
        speed = {}
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            turn(on)
            speed[on] = run(steps)
        rounds.append({"off": speed[False], "on": speed[True], "ratio": speed[True] / speed[False]})
        print(f"round {r + 1}: off {speed[False]:.1f} {unit}/s, on {speed[True]:.1f} ({speed[True] / speed[False]:.2f}x)", flush=True)
    median = statistics.median(x["ratio"] for x in rounds)
    print(f"{args.lever}: median ratio over {args.rounds} rounds {median:.2f}x ({args.precision}, {args.threads} threads, "
          f"{len(steps)} steps a round)")
    if args.json:
        atomic_write_json(Path(args.json), {"lever": args.lever, "precision": args.precision, "threads": args.threads,
                                            "steps": len(steps), "unit": f"{unit}_per_s", "rounds": rounds,
                                            "median_ratio": median})


if __name__ == "__main__":
    main()
