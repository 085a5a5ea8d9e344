"""Tied-LoRA (Renduchintala et al., 2024): y = W x + s · Λ_v B Λ_u A x, with A and B tied across layers.

Every target of one shape (in, out) uses the same trainable A: r×in and B: out×r; each layer trains
its own vectors u (r) and v (out). All four train, the paper's vBuA configuration. Init as LoRA:
A kaiming-uniform, B = 0, u = v = 1, so the model starts unchanged and the first step is that of a
LoRA whose factors are shared. s = alpha / r. Merges exactly: W' = W + s · Λ_v B Λ_u A.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register, replace_module


class TiedFactors(nn.Module):
    """The A and B shared by every layer of one shape.

    Each layer holds this one module, so the factors are one tensor each in memory, in the
    optimizer and in the adapter file, and stay one after a move to another device or dtype.
    """

    def __init__(self, in_features: int, out_features: int, r: int, like: torch.Tensor):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=like.dtype, device=like.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=like.dtype, device=like.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


class TiedLoraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, tied: TiedFactors, alpha: float):
        super().__init__(base_layer)
        self.tied = tied
        r = tied.lora_A.shape[0]
        self.scaling = alpha / r
        w = base_layer.weight
        self.lora_u = nn.Parameter(torch.ones(r, dtype=w.dtype, device=w.device))
        self.lora_v = nn.Parameter(torch.ones(self.out_features, dtype=w.dtype, device=w.device))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_v[:, None] * self.tied.lora_B) @ (self.lora_u[:, None] * self.tied.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.lora_v * F.linear(self.lora_u * F.linear(x, self.tied.lora_A), self.tied.lora_B) * self.scaling


@register
class TiedLoRA(Method):
    name = "tied_lora"
    mergeable = True
    default_roles = ("query", "value", "pooler")

    @dataclasses.dataclass
    class Config:
        r: int = 8
        alpha: float = 16
        target_modules: list[str] | None = None

        def __post_init__(self):
            _checks.at_least("r", self.r)
            _checks.positive("alpha", self.alpha)

    def apply(self, model, exclude):
        c = self.cfg
        tied: dict[tuple[int, int], TiedFactors] = {}
        for name, linear in self.targets(model, exclude):
            shape = (linear.in_features, linear.out_features)
            if shape not in tied:
                tied[shape] = TiedFactors(*shape, c.r, like=linear.weight)
            replace_module(model, name, TiedLoraLinear(linear, tied[shape], c.alpha))
