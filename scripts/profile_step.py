"""Where a step's time goes (training, or a pass scoring a dev split): torch's profiler over a few
peftkit steps, ops by self CPU time.

Three jobs it knows, each built with peftkit's own recipe, task and model code:
  cls   LoRA r=8 q,v on MiniLM, SST-2 (glue_lora), length-grouped batches of 32
  lm    LoRA r=8 q,k,v,o on SmolLM2-135M-Instruct (sft_lora), 3 packed rows of up to 512 GSM8K tokens
  eval  cls's model scoring SST-2's dev split as `peftkit eval` does: forward only, batches of 32
        sorted by length, the last layer on the first position; a "step" is one pass over the split

    .venv/bin/python scripts/profile_step.py cls --glue-dir ../shared/glue [--threads 2] [--json out.json]
    .venv/bin/python scripts/profile_step.py lm --math-dir ../shared/llm/math [--threads 1]
    python3 scripts/profile_step.py cls --device cuda --precision bf16   # on a GPU: is the step host-bound?
    .venv/bin/python scripts/profile_step.py cls --override backbone.path=DIR --override backbone.name=NAME  # another backbone

It prints the step's throughput without the profiler, then the top ops with their share of the
profiled time and, for matrix products, the rate they ran at (GFLOP/s, from the profiler's FLOP
counts), beside the rate of one large matmul of the same precision on the same threads (the most
this CPU gives), and the products split by shape (attention's `bmm`, LoRA's low-rank factors, the
Linears' weights); `--json` writes all of it. The optimizer is fused AdamW, as the trainer's.
`--compile` runs the model through `torch.compile(dynamic=True)` (inductor) and also reports how
long the warm-up steps took, which is where it compiles: compare with the same command without it
(the same batches are timed either way). `--device cuda` runs the step on the GPU as the trainer does
there (the frozen base in bf16 under bf16 autocast, no packing) and adds what decides a GPU step's
speed: the GPU's busy time (its kernels' time) against the step's wall time, and the kernel launches a step.
It also counts the host reads of GPU values in one step (`device_reads.HostReads`): each makes the host
wait for the GPU to finish everything queued before it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftkit import backbone, config, cpu, device_reads, model, tasks  # noqa: E402
from peftkit.data.batching import eval_batches, to_device, train_batches  # noqa: E402
from peftkit.device_reads import HostReads  # noqa: E402
from peftkit.files import atomic_write_json  # noqa: E402
from peftkit.methods.base import pack_frozen_linears, set_merged  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 8


def build(part: str, data_dir: str, overrides: list[str] = ()):
    if part in ("cls", "eval"):
        cfg = config.compose("glue_lora", ["dataset=glue/sst2", f"dataset.data_dir={data_dir}", "dataset.max_train_samples=8000", *overrides])
    else:
        cfg = config.compose("sft_lora", [f"dataset.data_dir={data_dir}", "dataset.max_train_samples=48", *overrides])
    kind = tasks.of(cfg.dataset)
    split = "validation" if part == "eval" else "train"
    data = kind.load_data(cfg.dataset, splits=(split,)) if part == "eval" else kind.load_data(cfg.dataset)
    a = model.build(cfg.backbone, cfg.method, getattr(data, "label_names", None), kind.NAME)
    if hasattr(kind, "skip_unread_positions"):  # as peftkit's trainer does (train.prepare_model)
        kind.skip_unread_positions(a.model, a.method)
    encoded = kind.encode(data, a.tokenizer, cfg)[split]
    if part == "eval":
        return kind, a.model, encoded, eval_batches(encoded.lengths, 32), a.trainable
    batches = train_batches(encoded.lengths, 32 if part == "cls" else 3, 0, 0, True)
    return kind, a.model, encoded, batches, a.trainable


def matmul_gflops(dtype: torch.dtype, device: torch.device = torch.device("cpu"), size: int = 2048) -> float:
    """The best rate of a (size × size) · (size × size) matmul in `dtype`: what this device gives at most."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = min(_seconds(lambda: (a @ b, sync())) for _ in range(3))
    return 2 * size**3 / best / 1e9


def gpu_busy(prof, wall_s: float, steps: int) -> dict:
    """A GPU step's split: the time its kernels ran (busy) against the step's wall time, and how many
    kernels the host launched. Busy well under wall means the host, not the GPU, sets the pace."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    launches = sum(1 for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    return {"wall_ms_per_step": wall_s * 1e3 / steps, "busy_ms_per_step": busy_us / 1e3 / steps,
            "busy_share": busy_us / 1e6 / wall_s, "kernels_per_step": len(kernels) / steps, "launches_per_step": launches / steps}


def product_kinds(prof, total: float) -> dict:
    """The matrix products split by shape: `bmm` (attention's batched products), products with a side
    of 16 or less (LoRA's low-rank factors), and the rest (the Linears' weights). Each: its share of the
    profiled time and its rate."""
    kinds: dict = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if not e.flops:
            continue
        sides = [n for shape in e.input_shapes if len(shape) == 2 for n in shape]
        name = "bmm" if e.key == "aten::bmm" else "low-rank (a side <= 16)" if sides and min(sides) <= 16 else "other (the Linears')"
        k = kinds.setdefault(name, {"self_s": 0.0, "flop": 0.0})
        k["self_s"] += e.self_cpu_time_total / 1e6
        k["flop"] += e.flops
    return {name: {"share": k["self_s"] * 1e6 / total, "gflop_per_s": k["flop"] / k["self_s"] / 1e9} for name, k in kinds.items()}


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("cls", "lm", "eval"))
    p.add_argument("--glue-dir", default=str(ROOT.parent / "shared" / "glue"))
    p.add_argument("--math-dir", default=str(ROOT.parent / "shared" / "llm" / "math"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--steps", type=int, default=None, help="steps timed and profiled (default: 20 cls, 1 lm, 1 eval: a pass over the split)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--merged", action="store_true", help="eval: the adapter folded into the weights (methods.base.set_merged), as a merged model")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (dynamic shapes) before the warm-up steps")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: the forward under CPU autocast, as trainer.precision=bf16 runs it")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override, repeatable (backbone.path=DIR: another backbone)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (20 if args.part == "cls" else 1)
    kind, net, train, batches, trainable = build(args.part, args.math_dir if args.part == "lm" else args.glue_dir, args.override)
    net.train(args.part != "eval")
    if args.merged:
        if args.part != "eval":
            sys.exit("--merged is for eval: a merged adapter does not train")
        set_merged(net, True)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        net.to(dev)
        device_reads.attend_without_reads(net, dev)  # as peftkit's trainer does off CPU (train.prepare_model)
    else:
        cpu.use_fast_dropout(net)  # as peftkit's trainer does on CPU
    if args.precision == "bf16":
        backbone.store_frozen_base(net, torch.bfloat16, trainable)  # as peftkit's trainer does under bf16 autocast
        if not cuda:
            pack_frozen_linears(net)  # and, on CPU, runs its frozen Linears on packed weights
    opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-4, fused=True)  # as the trainer's
    if args.compile:
        net = torch.compile(net, dynamic=True)
    unit = "tokens" if args.part == "lm" else "samples"
    bf16 = args.precision == "bf16"

    def batch(b):
        return to_device(train.batch(b), dev)  # as the trainer: on a GPU from pinned memory, without waiting

    def step(b):
        if args.part == "eval":
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                for one in b:  # one pass over the split
                    net(**{k: v for k, v in batch(one).items() if k != "labels"}).logits.float().argmax(-1)
            return
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = kind.loss(net, batch(b), train)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def size(b):
        if args.part == "eval":
            return sum(len(one) for one in b)
        return len(b) if unit == "samples" else sum(train.lengths[i] for i in b)

    if args.part == "eval":  # a step is a pass over the split; the first two batches warm up
        batches = [batches[:2]] + [batches] * (2 * steps)

    w = 1 if args.part == "eval" else min(WARMUP_STEPS, len(batches) - 2 * steps)  # enough batch shapes for a dynamic-shape compile to settle
    if w < 1:
        sys.exit(f"{len(batches)} batches: too few for a warm-up step and 2 x --steps {steps}")
    warm, timed, profiled = batches[:w], batches[w : w + steps], batches[w + steps : w + 2 * steps]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for b in warm:
        step(b)
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in timed:
        step(b)
    sync()
    seconds = time.perf_counter() - t0
    speed = sum(size(b) for b in timed) / seconds

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    t0 = time.perf_counter()
    with profile(activities=activities, with_flops=True, record_shapes=True) as prof:
        for b in profiled:
            step(b)
        sync()
    profiled_wall = time.perf_counter() - t0
    gpu = gpu_busy(prof, profiled_wall, steps) if cuda else None
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    top = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total, "calls": e.count,
            "gflop_per_s": e.flops / e.self_cpu_time_total / 1e3 if e.flops and e.self_cpu_time_total else None}
           for e in ops[: args.top]]
    products = [e for e in ops if e.flops]
    product_rate = sum(e.flops for e in products) / sum(e.self_cpu_time_total for e in products) / 1e3 if products else None
    kinds = product_kinds(prof, total)
    reads = None
    if cuda:
        with HostReads(dev) as reads:  # one more step: what in it makes the host wait for the GPU
            step(profiled[0])
            sync()
    peak = matmul_gflops(torch.bfloat16 if bf16 else torch.float32, dev)
    print(f"{args.part}{' compiled' if args.compile else ''}: {speed:.1f} {unit}/s over {steps} steps "
          f"({seconds / steps:.2f} s a step, {torch.get_num_threads()} threads) after {w} warm-up steps in {warmup_s:.1f} s; "
          f"profiled {total / 1e6:.2f} s over {steps} more")
    for t in top:
        rate = f"  {t['gflop_per_s']:6.0f} GFLOP/s" if t["gflop_per_s"] else ""
        print(f"  {t['share'] * 100:5.1f}%  {t['self_s']:7.2f} s  {t['calls']:6d}  {t['op']}{rate}")
    if product_rate:
        share = sum(e.self_cpu_time_total for e in products) / total
        print(f"matrix products: {share * 100:.1f}% of the profiled time at {product_rate:.0f} GFLOP/s; "
              f"one 2048² {args.precision} matmul here: {peak:.0f} GFLOP/s")
        for kind_name, k in kinds.items():
            print(f"  {kind_name}: {k['share'] * 100:.1f}% at {k['gflop_per_s']:.0f} GFLOP/s")
    if gpu:
        print(f"host reads of GPU values in a {'pass' if args.part == 'eval' else 'step'}: {reads.count}"
              + "".join(f"\n  {n} x {w}" for w, n in reads.where.most_common()))
        print(f"GPU: busy {gpu['busy_ms_per_step']:.2f} ms of a {gpu['wall_ms_per_step']:.2f} ms step "
              f"({gpu['busy_share'] * 100:.1f}%), {gpu['launches_per_step']:.0f} kernel launches a step; "
              f"the rate above is of host time, not the GPU's")
    if args.json:
        atomic_write_json(Path(args.json), {"part": args.part, "merged": args.merged, "compile": args.compile, "precision": args.precision,
                                            f"{unit}_per_s": speed, "threads": torch.get_num_threads(), "steps": steps,
                                            "warmup_steps": w, "warmup_s": warmup_s, "profiled_s": total / 1e6, "top": top,
                                            "matrix_products_gflop_per_s": product_rate, "product_kinds": kinds,
                                            "large_matmul_gflop_per_s": peak, "device": args.device, "gpu": gpu,
                                            **({"host_reads_per_step": reads.count, "host_reads": dict(reads.where)} if reads else {})})


if __name__ == "__main__":
    main()
