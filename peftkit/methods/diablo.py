"""DiaBlo (Gurses et al., 2025): only the diagonal blocks of W train.

ΔW = diag(D_1, …, D_n): n blocks of ⌈out/N⌉ × ⌈in/N⌉ on W's diagonal, so y = W x + ΔW x without
low-rank products or special inits; every D_i starts at zero, so the layer starts as W. When N
does not divide a dimension the blocks are padded at the end and ΔW cropped to out × in (as the
authors' code); when N exceeds a dimension, fewer, 1-wide blocks cover the shorter side. Merges
exactly: W' = W + ΔW.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register


class DiaBloLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, num_blocks: int, dropout: float):
        super().__init__(base_layer)
        self.block_in = math.ceil(self.in_features / num_blocks)
        self.block_out = math.ceil(self.out_features / num_blocks)
        n = min(math.ceil(self.in_features / self.block_in), math.ceil(self.out_features / self.block_out))
        w = base_layer.weight
        self.diablo_blocks = nn.Parameter(torch.zeros(n, self.block_out, self.block_in, dtype=w.dtype, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        d = torch.block_diag(*self.diablo_blocks)
        return F.pad(d, (0, self.in_features - d.shape[1], 0, self.out_features - d.shape[0]))  # < 0 crops

    def block_forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x one block at a time, never building ΔW."""
        n = self.diablo_blocks.shape[0]
        x = F.pad(x, (0, n * self.block_in - self.in_features)).unflatten(-1, (n, self.block_in))
        y = torch.einsum("...ni,noi->...no", x, self.diablo_blocks).flatten(-2)
        return F.pad(y, (0, self.out_features - n * self.block_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.block_forward(self.dropout(x))


@register
class DiaBlo(Method):
    name = "diablo"
    mergeable = True
    default_roles = ("query", "key", "value", "ffn_in", "ffn_out", "pooler")

    @dataclasses.dataclass
    class Config:
        num_blocks: int = 64
        dropout: float = 0.0
        target_modules: list[str] | None = None

        def __post_init__(self):
            _checks.at_least("num_blocks", self.num_blocks)
            _checks.dropout(self.dropout)

    def wrap(self, linear):
        c = self.cfg
        return DiaBloLinear(linear, c.num_blocks, c.dropout)
