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

Dropout: torch draws a CPU dropout mask one Mersenne-Twister number per element (MKL's vectorised
generator only on Intel CPUs): 17% of a bf16 LoRA step on MiniLM (scripts/profile_step.py).
`use_fast_dropout` draws only the positions it drops (about 0.1 numbers an element at p = 0.1) and
zeroes them in place: the same independent Bernoulli(p) drops, from the same seeded generator.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch
from torch import nn

from peftkit import device_reads


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, as a container or taskset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def probe_seconds(threads: int, repeats: int = 2) -> float:
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


PROBE_ROUNDS = 5  # each a 1-thread and an all-cores timing, back to back; the median of their ratios decides
PROBE_ATTEMPTS = 2  # probes before settling on 1 thread
# On a 2-core VM (scripts/probe_threads.py, 20 trials each): idle, the old rule (the best time of each
# count over 3 rounds) fell below 1.3 in 4 trials, one probe of this rule in 2 (so two probes, about 1
# run in 100); with a busy loop on one core, both stayed below 1.3 in all 20 (at most 1.28 and 1.05).
# The old rule left 2 of 7 `llm_bench.py speed` runs on one thread (242 against 349 tokens/s).


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
    for _ in range(PROBE_ATTEMPTS):  # a second probe before one thread: a slow moment of the other cores does not decide the run
        ratio = statistics.median(probe(1) / probe(cores) for _ in range(PROBE_ROUNDS))
        if ratio >= 1.3:
            break
    chosen = cores if ratio >= 1.3 else 1
    torch.set_num_threads(chosen)
    return chosen, f"auto: a probe matmul ran {ratio:.2f}x as fast on {cores} threads as on 1"


def bf16_slowdown(size: int = 256, repeats: int = 2) -> float:
    """How many times slower a bf16 matmul is than an fp32 one here, now, best times of each (a few
    ms; about 0.1 s on a CPU that emulates bf16)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    fp32 = _best_matmul_seconds(a, b, repeats)
    return _best_matmul_seconds(a.bfloat16(), b.bfloat16(), repeats) / max(fp32, 1e-9)


# ---- dropout -------------------------------------------------------------------------------------------------

FAST_ATTENTION = "peftkit_cpu_dropout_sdpa"


def dropped_positions(n: int, p: float) -> torch.Tensor:
    """Flat positions (0 ≤ i < n, repeats allowed) such that each of the n is among them independently
    with probability p: a Poisson(−n·ln(1 − p)) number of draws, each uniform over n. By Poisson
    splitting each position is then drawn an independent Poisson(−ln(1 − p)) times, at least once with
    probability 1 − e^(ln(1 − p)) = p (up to `randint`'s modulo bias, under n/2³² relative). About
    −ln(1 − p) random numbers an element (0.105 at p = 0.1) where a mask takes one."""
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    draws = int(torch.poisson(torch.tensor(-n * math.log1p(-p), dtype=torch.float64)))
    return torch.randint(0, n, (draws,))


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout on CPU with `dropped_positions`: x · 1/(1 − p), those positions zeroed.
    Under torch.compile it is torch's dropout: the count drawn on the host would split the graph at
    every dropout (74 pieces a MiniLM step), and inductor fuses torch's mask into its neighbours."""
    if p <= 0:
        return x
    if torch.compiler.is_compiling():
        return nn.functional.dropout(x, p)
    if p >= 1:
        return x * 0
    return _DropPositions.apply(x, dropped_positions(x.numel(), p), 1 / (1 - p))


def _scaled_and_dropped(x: torch.Tensor, dropped: torch.Tensor, scale: float) -> torch.Tensor:
    """x · scale in a new contiguous tensor (so flat positions mean the same in the forward and the
    gradient), `dropped` set to 0: two passes, no mask in x's dtype to build or multiply."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x, scale, out=out)
    return out.view(-1).index_fill_(0, dropped, 0).view(x.shape)


class _DropPositions(torch.autograd.Function):
    """Dropout keeping the dropped positions for the gradient (8 bytes each: 0.84 bytes an element at
    p = 0.1, where torch's bool mask keeps 1)."""

    @staticmethod
    def forward(ctx, x, dropped, scale):
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return _scaled_and_dropped(x, dropped, scale)

    @staticmethod
    def backward(ctx, grad):
        (dropped,) = ctx.saved_tensors
        return _scaled_and_dropped(grad, dropped, ctx.scale), None, None


class Dropout(nn.Dropout):
    """nn.Dropout with `fast_dropout`'s mask in training on CPU; torch's own anywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == "cpu" and not self.inplace:
            return fast_dropout(x, self.p)
        return super().forward(x)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap the model's nn.Dropout modules for `Dropout` and, where its attention is SDPA with
    dropout, attend with `dropout_sdpa`. Returns how many modules were swapped."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout and child.p > 0:
                fast = Dropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(module, name, fast)
                swapped += 1
    config = getattr(model, "config", None)
    attention_dropout = max((getattr(config, k, 0) or 0) for k in ("attention_probs_dropout_prob", "attention_dropout")) if config else 0
    if attention_dropout > 0 and getattr(config, "_attn_implementation", None) == "sdpa":
        device_reads.register_attention(FAST_ATTENTION, dropout_sdpa)
        model.set_attn_implementation(FAST_ATTENTION)
    return swapped


def dropout_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA, except in training with attention dropout on CPU, where torch would draw its slow mask:
    softmax(q·kᵀ·scale + mask) with `fast_dropout`'s mask, then ·v (the math SDPA does, fp32 softmax)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if (dropout <= 0 or not module.training or query.device.type != "cpu" or causal
            or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sliding_window"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[2]]
    out = torch.matmul(attention_probs(scores, mask, dropout, query.dtype), value)
    return out.transpose(1, 2).contiguous(), None


def attention_probs(scores: torch.Tensor, mask: torch.Tensor | None, dropout: float, dtype: torch.dtype) -> torch.Tensor:
    """softmax(scores + mask) in fp32, in `dtype`, then dropout (`fast_dropout` on CPU): a bool mask
    marks what may be attended, a float one is added."""
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    if dropout <= 0:
        return probs
    return fast_dropout(probs, dropout) if probs.device.type == "cpu" else nn.functional.dropout(probs, dropout)
