"""LoRA (Hu et al., 2021): y = W x + s · B A x, with A: r×in, B: out×r, B = 0 at init.

s = alpha / r, or alpha / sqrt(r) with `rslora` (Kalajdzievski, 2023), which keeps the update's
scale stable as r grows. Merges exactly: W' = W + s · B A.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import UserError
from peftkit.methods.base import AdapterLinear, Method, register


class LoraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool, init: str):
        super().__init__(base_layer)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "kaiming":  # as torch's nn.Linear, and peft's default
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:
            raise UserError(f"unknown lora init '{init}'; choose one of: kaiming, gaussian")

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False


@register
class LoRA(Method):
    name = "lora"
    mergeable = True
    default_roles = ("query", "value", "pooler")

    @dataclasses.dataclass
    class Config:
        r: int = 8
        alpha: float = 16
        dropout: float = 0.0
        rslora: bool = False
        init: str = "kaiming"
        target_modules: list[str] | None = None

    def wrap(self, linear):
        c = self.cfg
        if c.r < 1:
            raise UserError(f"method.r must be at least 1, got {c.r}")
        return LoraLinear(linear, c.r, c.alpha, c.dropout, c.rslora, c.init)
