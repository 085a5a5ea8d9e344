"""What this CPU can give a run: how many threads, and whether bf16 pays.

Threads: torch's default is one per core, which on a busy machine (other jobs, a sweep's other
processes) makes each step wait for cores that are not free: a user's run went 5.5x slower than
with one thread (9.5 against 52.4 samples/s). So with `trainer.threads=null` peftkit times a
matmul of a transformer layer's size at 1 thread and at every core it may use, and keeps the
faster (fewer threads unless more are clearly faster). `trainer.threads=N` or OMP_NUM_THREADS
decide instead; several processes on one machine (DDP) share its cores.

bf16: on a CPU without bf16 matrix units (AVX512-BF16 or AMX) torch multiplies bf16 matrices in
software: on a 2-core AMD EPYC (AVX2) `bf16_slowdown` found it 19-57x slower than fp32.
`trainer.precision=bf16` there would crawl, so the run says so before it starts.
"""

from __future__ import annotations

import os
import time

import torch


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, as a container or taskset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def probe_seconds(threads: int, repeats: int = 3) -> float:
    """Best time of a (1024×384)·(384×1536) fp32 matmul, about a MiniLM FFN layer's batch of 32 × 32 tokens."""
    torch.set_num_threads(threads)
    return _best_matmul_seconds(torch.randn(1024, 384), torch.randn(384, 1536), repeats)


def _best_matmul_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """The best of `repeats` timings of a @ b, after one untimed (the thread pool starts)."""
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def choose_threads(requested: int | None, processes: int = 1, probe=probe_seconds) -> tuple[int, str]:
    """(threads, why) and set them: `requested`, OMP_NUM_THREADS, or the faster of 1 and all free
    cores (more only if at least 1.3x faster: threads that wait for busy cores cost more than they give)."""
    if requested:
        torch.set_num_threads(requested)
        return requested, "trainer.threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = max(1, available_cores() // max(1, processes))
    if torch.cuda.is_available() or cores == 1:
        torch.set_num_threads(cores)
        return cores, f"{cores} core{'s' * (cores > 1)}"
    one, many = probe(1), probe(cores)
    chosen = cores if many * 1.3 < one else 1
    torch.set_num_threads(chosen)
    return chosen, f"auto: a probe matmul took {one * 1e3:.1f} ms on 1 thread, {many * 1e3:.1f} ms on {cores}"


def bf16_slowdown(size: int = 256, repeats: int = 2) -> float:
    """How many times slower a bf16 matmul is than an fp32 one here, now, best times of each (a few
    ms; about 0.1 s on a CPU that emulates bf16)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    fp32 = _best_matmul_seconds(a, b, repeats)
    return _best_matmul_seconds(a.bfloat16(), b.bfloat16(), repeats) / max(fp32, 1e-9)
