"""Hydra (Kim et al., 2023): a parallel and a sequential LoRA branch on one Linear.

h = W x + b, then y = h + s · B_p A_p x + s · B_s A_s h, with A_p: r×in, A_s: r×out, B_p, B_s: out×r.
The parallel branch learns new features from the input (as LoRA); the sequential one recombines
the pretrained output features, so the target need not be square (A_s reads the out-dim output).
As in the authors' code the sequential branch sees the layer's output bias too. Both B start at 0,
so the layer starts as its base; s = alpha / r. Merges exactly, since the update is linear in h:
W' = W + s (B_p A_p + B_s A_s W), b' = b + s B_s A_s b. Unmerging inverts I + s B_s A_s through
the r×r system (Woodbury).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register


class HydraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float):
        super().__init__(base_layer)
        self.scaling = alpha / r
        w = base_layer.weight

        def zeros(*shape):
            return nn.Parameter(torch.zeros(*shape, dtype=w.dtype, device=w.device))

        self.hydra_par_A, self.hydra_par_B = zeros(r, self.in_features), zeros(self.out_features, r)
        self.hydra_seq_A, self.hydra_seq_B = zeros(r, self.out_features), zeros(self.out_features, r)
        nn.init.kaiming_uniform_(self.hydra_par_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.hydra_seq_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        if self.merged:
            return h
        parallel = F.linear(F.linear(x, self.hydra_par_A), self.hydra_par_B)
        sequential = F.linear(F.linear(h, self.hydra_seq_A), self.hydra_seq_B)
        return h + (parallel + sequential) * self.scaling

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s·B_p A_p, s·B_s, A_s) in float64: merge and unmerge round once, at the end."""
        s = self.scaling
        par = s * self.hydra_par_B.double() @ self.hydra_par_A.double()
        return par, s * self.hydra_seq_B.double(), self.hydra_seq_A.double()

    @torch.no_grad()
    def merge(self) -> None:
        w, b = self.base_layer.weight, self.base_layer.bias
        par, seq_b, seq_a = self._factors()
        w64 = w.double()
        w.copy_(w64 + par + seq_b @ (seq_a @ w64))
        if b is not None:
            b.copy_(b.double() + seq_b @ (seq_a @ b.double()))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        w, b = self.base_layer.weight, self.base_layer.bias
        par, seq_b, seq_a = self._factors()
        core = torch.eye(seq_a.shape[0], dtype=torch.float64, device=w.device) + seq_a @ seq_b

        def undo_sequential(m: torch.Tensor) -> torch.Tensor:  # (I + s B_s A_s)⁻¹ m
            return m - seq_b @ torch.linalg.solve(core, seq_a @ m)

        w.copy_(undo_sequential(w.double() - par))
        if b is not None:
            b.copy_(undo_sequential(b.double()[:, None])[:, 0])
        self.merged = False


@register
class HydraLoRA(Method):
    name = "hydra_lora"
    mergeable = True
    default_roles = ("attn_out", "ffn_out", "pooler")

    @dataclasses.dataclass
    class Config:
        r: int = 8
        alpha: float = 16
        target_modules: list[str] | None = None

        def __post_init__(self):
            _checks.at_least("r", self.r)
            _checks.positive("alpha", self.alpha)

    def wrap(self, linear):
        return HydraLinear(linear, self.cfg.r, self.cfg.alpha)
