"""LoRA-XS (Bałazy et al., 2024): y = W x + s · U_r R Σ_r V_rᵀ x, where only the r×r R trains.

U_r, Σ_r, V_r are W's top-r singular triplets (W = U Σ Vᵀ), frozen; the singular values are folded
into the input side as in the authors' code: A = Σ_r V_rᵀ (r×in), B = U_r (out×r), y = W x + s · B R A x
with s = alpha / r. A and B are saved with the adapter (a fresh SVD on another machine may differ
in its last bits or signs), so the trainable count is r² per layer whatever the layer's size.
R starts at zero (the model starts exactly as W) or, as in the paper, N(0, 1e-5²).
Merges exactly: W' = W + s · B R A.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register

INITS = ("zero", "gaussian")
PAPER_INIT_STD = 1e-5


class LoraXSLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, init: str):
        super().__init__(base_layer)
        self.scaling = alpha / r
        w = base_layer.weight
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        self.register_buffer("lora_xs_A", (s[:r, None] * vh[:r]).to(w.dtype))
        self.register_buffer("lora_xs_B", u[:, :r].to(w.dtype).contiguous())
        self.lora_xs_R = nn.Parameter(torch.zeros(r, r, dtype=w.dtype, device=w.device))
        if init == "gaussian":
            nn.init.normal_(self.lora_xs_R, std=PAPER_INIT_STD)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_xs_B @ self.lora_xs_R @ self.lora_xs_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = F.linear(F.linear(self.dropout(x), self.lora_xs_A), self.lora_xs_R)
        return y + F.linear(h, self.lora_xs_B) * self.scaling


@register
class LoraXS(Method):
    name = "lora_xs"
    mergeable = True
    default_roles = ("query", "value", "attn_out", "ffn_out", "pooler")

    @dataclasses.dataclass
    class Config:
        r: int = 8
        alpha: float = 16
        dropout: float = 0.0
        init: str = "gaussian"
        target_modules: list[str] | None = None

        def __post_init__(self):
            _checks.at_least("r", self.r)
            _checks.one_of("lora_xs init", self.init, INITS)
            _checks.positive("alpha", self.alpha)
            _checks.dropout(self.dropout)

    def wrap(self, linear):
        c = self.cfg
        if c.r > min(linear.weight.shape):
            raise UserError(f"lora_xs needs r ≤ min(out, in) = {min(linear.weight.shape)} for every target, got r={c.r}")
        return LoraXSLinear(linear, c.r, c.alpha, c.dropout, c.init)
