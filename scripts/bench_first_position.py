"""The classifier's last layer on the first position only (`tasks.classification.skip_unread_positions`)
against the whole layer: the same LoRA training steps, the two models interleaved in one process, so
the machine's drift falls on both alike.

    .venv/bin/python scripts/bench_first_position.py --precision bf16 --rounds 6 --json out.json

Each round runs `--steps` length-grouped batches of 32 (glue_lora on the first 8,000 rows of SST-2,
MiniLM, fast CPU dropout, `store_frozen_base` under bf16 autocast, as the trainer runs them) with the
whole last layer, then the same batches with the first position only; it prints samples/s of each
and their ratio, and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftkit import backbone, config, cpu, model, tasks  # noqa: E402
from peftkit.data.batching import train_batches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glue-dir", default=str(ROOT.parent / "shared" / "glue"))
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config.compose("glue_lora", ["dataset=glue/sst2", f"dataset.data_dir={args.glue_dir}", "dataset.max_train_samples=8000"])
    kind = tasks.of(cfg.dataset)
    data = kind.load_data(cfg.dataset)
    bf16 = args.precision == "bf16"
    runs = {}
    for first in (False, True):
        torch.manual_seed(0)
        a = model.build(cfg.backbone, cfg.method, data.label_names, kind.NAME)
        if first and not kind.skip_unread_positions(a.model, a.method):
            raise SystemExit("the shortcut does not apply to this model")
        a.model.train()
        cpu.use_fast_dropout(a.model)
        if bf16:
            backbone.store_frozen_base(a.model, torch.bfloat16, a.trainable)
        opt = torch.optim.AdamW([q for q in a.model.parameters() if q.requires_grad], lr=1e-4)
        runs[first] = (a.model, opt)
        train = kind.encode(data, a.tokenizer, cfg)["train"]
    batches = train_batches(train.lengths, 32, 0, 0, True)[: args.steps]

    def speed(first: bool) -> float:
        net, opt = runs[first]
        t0 = time.perf_counter()
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = kind.loss(net, train.batch(b), train)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return 32 * len(batches) / (time.perf_counter() - t0)

    speed(False), speed(True)  # warm-up
    rounds = []
    for r in range(args.rounds):
        whole, first = speed(False), speed(True)
        rounds.append({"whole": whole, "first_position": first, "ratio": first / whole})
        print(f"round {r + 1}: whole {whole:.1f} samples/s, first position {first:.1f} ({first / whole:.2f}x)")
    median = statistics.median(x["ratio"] for x in rounds)
    print(f"median ratio over {args.rounds} rounds: {median:.2f}x ({args.precision}, {args.threads} threads, {args.steps} steps a round)")
    if args.json:
        Path(args.json).write_text(json.dumps({"precision": args.precision, "threads": args.threads, "steps": args.steps,
                                               "rounds": rounds, "median_ratio": median}, indent=2) + "\n")


if __name__ == "__main__":
    main()
