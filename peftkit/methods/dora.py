"""DoRA (Liu et al., 2024): LoRA on the direction of each output row, with a learned magnitude.

W' = m ⊙ (W + s · B A) / ‖W + s · B A‖, the norm taken per output row (over the inputs), so the
row directions follow LoRA while m (one scalar per output, init ‖W‖) sets their lengths. B = 0 and
m = ‖W‖ at init, so the model starts unchanged. As the paper suggests (§4.3) and peft does, the
norm is a constant for backprop: gradients reach m, A and B but not through the norm.
Merges exactly: W ← (m / ‖W + s · B A‖) ⊙ (W + s · B A), the bias left as it is.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.methods.base import register
from peftkit.methods.lora import LoRA, LoraLinear, check_options

INITS = ("kaiming", "gaussian")


class DoraLinear(LoraLinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool, init: str):
        super().__init__(base_layer, r, alpha, dropout, rslora, init)
        self.dora_magnitude = nn.Parameter(self.row_norm())
        self.merged_norm: torch.Tensor | None = None  # the norm merging divided by, needed to unmerge

    @torch.no_grad()
    def row_norm(self) -> torch.Tensor:
        """‖W + s · B A‖ per output row, of the unmerged W."""
        return torch.linalg.norm(self.base_layer.weight + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        scale = self.dora_magnitude / self.row_norm()
        wx = y if self.base_layer.bias is None else y - self.base_layer.bias
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        # y + (g - 1)·Wx + g·s·BAx = g·(Wx + s·BAx) + b, and exactly the base output while g = 1
        return y + (scale - 1) * wx + scale * lora

    @torch.no_grad()
    def merge(self) -> None:
        w = self.base_layer.weight
        self.merged_norm = self.row_norm()
        scale = (self.dora_magnitude / self.merged_norm).to(w.dtype)
        w.copy_(scale[:, None] * (w + self.delta_weight().to(w.dtype)))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        w = self.base_layer.weight
        scale = (self.dora_magnitude / self.merged_norm).to(w.dtype)
        w.copy_(w / scale[:, None] - self.delta_weight().to(w.dtype))
        self.merged_norm = None
        self.merged = False


@register
class DoRA(LoRA):
    """LoRA's config (without PiSSA's init) and targets; only the wrapped layer differs."""

    name = "dora"
    embeddings = False  # its magnitude is per output row of a Linear

    @dataclasses.dataclass
    class Config(LoRA.Config):
        def __post_init__(self):
            check_options(self, "dora", INITS)

    def wrap(self, linear):
        c = self.cfg
        return DoraLinear(linear, c.r, c.alpha, c.dropout, c.rslora, c.init)
