"""Hadamard-product updates: ΔW = s · (B₁A₁) ⊙ (B₂A₂), with A_i: r_i×in and B_i: out×r_i.

The element-wise product of two rank-r factors can reach rank r₁·r₂ for the parameters of a rank
r₁+r₂ LoRA. ΔW x is computed without forming ΔW, as the ABBA paper does: (B₁A₁ ⊙ B₂A₂) x =
(B₁ ∗ B₂)((A₁ ∗ A₂) x), where B₁ ∗ B₂ (out × r₁r₂) holds the row-wise and A₁ ∗ A₂ (r₁r₂ × in) the
column-wise Kronecker products (Khatri-Rao), so the adapter costs what an r₁r₂-rank LoRA costs.
Both methods merge exactly: W' = W + ΔW. They differ only in init and scale:

- LoHa (Hyeon-Woo et al., 2022, FedPara): r₁ = r₂ = r, s = alpha / r; B₁, A₁, B₂ Kaiming-uniform and
  A₂ = 0, as peft and LyCORIS do, so ΔW starts at 0.
- ABBA (Singhal et al., 2025): B₁A₁ starts as the best rank-r₁ approximation of W (truncated SVD,
  √Σ on each side), B₂ = 0 and A₂ Kaiming-uniform as in LoRA, so ΔW still starts at 0 but its first
  steps are shaped by W, as HiRA's W ⊙ BA is, without staying tied to W. s = alpha / √(r₁r₂).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register


class HadamardLinear(AdapterLinear):
    """W x + s · ((B₁A₁) ⊙ (B₂A₂)) x; subclasses set the ranks, the scale and the init."""

    def __init__(self, base_layer: nn.Linear, r1: int, r2: int, scaling: float):
        super().__init__(base_layer)
        self.scaling = scaling
        w = base_layer.weight

        def factor(*shape):
            return nn.Parameter(torch.zeros(*shape, dtype=w.dtype, device=w.device))

        self.hada_A1, self.hada_B1 = factor(r1, self.in_features), factor(self.out_features, r1)
        self.hada_A2, self.hada_B2 = factor(r2, self.in_features), factor(self.out_features, r2)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.hada_B1 @ self.hada_A1) * (self.hada_B2 @ self.hada_A2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        a = (self.hada_A1[:, None, :] * self.hada_A2[None, :, :]).flatten(0, 1)  # (r1·r2, in)
        b = (self.hada_B1[:, :, None] * self.hada_B2[:, None, :]).flatten(1)  # (out, r1·r2)
        return y + F.linear(F.linear(x, a), b) * self.scaling


class LohaLinear(HadamardLinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float):
        super().__init__(base_layer, r, r, alpha / r)
        for p in (self.hada_B1, self.hada_A1, self.hada_B2):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))


class AbbaLinear(HadamardLinear):
    def __init__(self, base_layer: nn.Linear, r1: int, r2: int, alpha: float):
        super().__init__(base_layer, r1, r2, alpha / math.sqrt(r1 * r2))
        w = base_layer.weight
        u, sigma, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
        root = sigma[:r1].sqrt()
        with torch.no_grad():
            self.hada_B1.copy_(u[:, :r1] * root)
            self.hada_A1.copy_(root[:, None] * vh[:r1])
        nn.init.kaiming_uniform_(self.hada_A2, a=math.sqrt(5))


def _check_rank_limit(key: str, r: int, limit: int) -> None:
    if r > limit:
        raise UserError(f"method.{key}={r} exceeds the target's rank limit min(out, in) = {limit}; choose 1..{limit}")


@register
class LoHa(Method):
    name = "loha"
    mergeable = True
    default_roles = ("query", "value", "pooler")

    @dataclasses.dataclass
    class Config:
        r: int = 8
        alpha: float = 8
        target_modules: list[str] | None = None

        def __post_init__(self):
            _checks.at_least("r", self.r)
            _checks.positive("alpha", self.alpha)

    def wrap(self, linear):
        return LohaLinear(linear, self.cfg.r, self.cfg.alpha)


@register
class ABBA(Method):
    name = "abba"
    mergeable = True
    default_roles = ("query", "value", "pooler")

    @dataclasses.dataclass
    class Config:
        r1: int = 4
        r2: int = 4
        alpha: float = 32
        target_modules: list[str] | None = None

        def __post_init__(self):
            _checks.at_least("r1", self.r1)
            _checks.at_least("r2", self.r2)
            _checks.positive("alpha", self.alpha)

    def wrap(self, linear):
        c = self.cfg
        _check_rank_limit("r1", c.r1, min(linear.in_features, linear.out_features))  # B₁A₁ is a truncated SVD of W
        return AbbaLinear(linear, c.r1, c.r2, c.alpha)
