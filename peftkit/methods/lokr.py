"""LoKr (LyCORIS; as in peft's LoKrConfig): ΔW = s · (W₁ ⊗ W₂), a Kronecker product.

out = a·b and in = c·d are each split into two factors (`kron_split`), W₁ is a×c and W₂ is b×d. A
factor too large for rank r (r < max(rows, cols) / 2) is itself low rank, B A: always an option for
W₂, and for W₁ with `decompose_both`. W₁ (or its B) starts at zero and the rest Kaiming-uniform, so
ΔW starts at 0. s = alpha / r, as peft. ΔW x is computed without forming ΔW: with x viewed as a c×d
matrix X, (W₁ ⊗ W₂) x = vec(W₁ X W₂ᵀ). Merges exactly: W' = W + ΔW.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register


def kron_split(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split dim = m·n for the Kronecker factors, the rule LyCORIS and peft use.

    `factor` -1: the most balanced split (m the largest divisor ≤ √dim). A factor that divides dim
    is taken as m exactly; otherwise m is the largest divisor ≤ min(factor, √dim).
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    cap = math.isqrt(dim) if factor == -1 else min(factor, math.isqrt(dim))
    m = max(d for d in range(1, cap + 1) if dim % d == 0)
    return m, dim // m


class FullFactor(nn.Module):
    """A Kronecker factor stored whole."""

    def __init__(self, rows: int, cols: int, like: torch.Tensor, zero: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, cols, dtype=like.dtype, device=like.device))
        if not zero:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self) -> torch.Tensor:
        return self.weight


class LowRankFactor(nn.Module):
    """A Kronecker factor stored as B A (rows×r, r×cols); `zero` starts B at zero."""

    def __init__(self, rows: int, cols: int, r: int, like: torch.Tensor, zero: bool):
        super().__init__()
        self.B = nn.Parameter(torch.zeros(rows, r, dtype=like.dtype, device=like.device))
        self.A = nn.Parameter(torch.zeros(r, cols, dtype=like.dtype, device=like.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if not zero:
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))

    def forward(self) -> torch.Tensor:
        return self.B @ self.A


def _factor(rows: int, cols: int, r: int, low_rank: bool, like: torch.Tensor, zero: bool) -> nn.Module:
    return LowRankFactor(rows, cols, r, like, zero) if low_rank else FullFactor(rows, cols, like, zero)


class LokrLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, decompose_factor: int, decompose_both: bool):
        super().__init__(base_layer)
        self.scaling = alpha / r
        a, b = kron_split(self.out_features, decompose_factor)
        c, d = kron_split(self.in_features, decompose_factor)
        w = base_layer.weight
        self.lokr_w1 = _factor(a, c, r, decompose_both and r < max(a, c) / 2, w, zero=True)
        self.lokr_w2 = _factor(b, d, r, r < max(b, d) / 2, w, zero=False)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * torch.kron(self.lokr_w1(), self.lokr_w2())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        w1, w2 = self.lokr_w1(), self.lokr_w2()
        x_mat = x.unflatten(-1, (w1.shape[1], w2.shape[1]))
        return y + (w1 @ x_mat @ w2.T).flatten(-2) * self.scaling


@register
class LoKr(Method):
    name = "lokr"
    mergeable = True
    default_roles = ("query", "value", "pooler")

    @dataclasses.dataclass
    class Config:
        r: int = 8
        alpha: float = 8
        decompose_factor: int = -1
        decompose_both: bool = False
        target_modules: list[str] | None = None

        def __post_init__(self):
            _checks.at_least("r", self.r)
            _checks.positive("alpha", self.alpha)
            if self.decompose_factor != -1 and self.decompose_factor < 1:
                raise UserError(f"method.decompose_factor must be -1 (most balanced split) or a positive integer, got {self.decompose_factor}")

    def wrap(self, linear):
        c = self.cfg
        return LokrLinear(linear, c.r, c.alpha, c.decompose_factor, c.decompose_both)
