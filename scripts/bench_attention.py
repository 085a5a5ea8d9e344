"""Attention kernels on CPU by sequence length: torch's SDPA (the flash kernel) against plain matmuls.

    .venv/bin/python scripts/bench_attention.py [--threads 2] [--json out.json]

Two jobs, the best of 3 timings of `--calls` calls each, bf16 and fp32:
  causal   one packed example of a causal LM, forward and backward: SmolLM2's heads (9 query heads,
           3 key heads, 64 dims), SDPA (`is_causal`, `enable_gqa`) against
           `tasks.causal_lm.short_causal_attention`, which `packed_sdpa` uses in bf16 up to
           `SHORT_EXAMPLE` tokens
  padded   a classification eval batch, forward only: MiniLM's heads (12 heads of 32), 32 rows
           padded to the length (row lengths drawn between half of it and it, an additive mask),
           SDPA against q·kᵀ·scale + mask → softmax → ·v
It prints milliseconds per call and the ratio SDPA / plain for each length.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftkit.files import atomic_write_json  # noqa: E402
from peftkit.tasks.causal_lm import short_causal_attention  # noqa: E402


def best_ms(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def causal(length: int, dtype, calls: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, length, 64, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(1, 3, length, 64, generator=g).to(dtype).requires_grad_() for _ in range(2))
    up = torch.randn(1, 9, length, 64, generator=g).to(dtype)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(up)  # noqa: E731
    plain = lambda: short_causal_attention(q, k, v, None).backward(up)  # noqa: E731
    return {"sdpa_ms": best_ms(sdpa, calls), "plain_ms": best_ms(plain, calls)}


def padded(length: int, dtype, calls: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(32, 12, length, 32, generator=g).to(dtype) for _ in range(3))
    rows = torch.randint(length // 2, length + 1, (32,), generator=g)
    keep = torch.arange(length)[None, :] < rows[:, None]
    mask = torch.zeros(32, 1, 1, length, dtype=dtype).masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min)

    def plain():
        return torch.softmax(q @ k.transpose(2, 3) * 32**-0.5 + mask, dim=-1) @ v

    with torch.inference_mode():
        return {"sdpa_ms": best_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), calls),
                "plain_ms": best_ms(plain, calls)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for job, fn, lengths in (("causal", causal, (64, 128, 256, 512, 1024)), ("padded", padded, (16, 32, 64, 128))):
        for dtype in (torch.bfloat16, torch.float32):
            for n in lengths:
                r = {"job": job, "dtype": str(dtype).removeprefix("torch."), "length": n, **fn(n, dtype, args.calls)}
                r["sdpa_over_plain"] = r["sdpa_ms"] / r["plain_ms"]
                rows.append(r)
                print(f"{job:6s} {r['dtype']:8s} {n:5d} tokens: SDPA {r['sdpa_ms']:7.2f} ms, plain {r['plain_ms']:7.2f} ms "
                      f"({r['sdpa_over_plain']:.2f}x)", flush=True)
    if args.json:
        atomic_write_json(Path(args.json), {"threads": args.threads, "calls": args.calls, "rows": rows})


if __name__ == "__main__":
    main()
