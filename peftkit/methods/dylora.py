"""DyLoRA (Valipour et al., 2023): LoRA trained at every rank 1..r at once, so any rank ≤ r serves.

The rank-b adapter is the first b components: y = W x + (alpha/b) · B[:, :b] A[:b] x. Each
training step uses one b ~ U{1..r}, drawn from torch's RNG after the previous optimizer step and
shared by every layer; the draw is a saved buffer and the trainer checkpoints the RNG, so a
resumed run draws the same ranks. Every component ≤ b trains at that step (plain backprop
through the slices), not only the b-th as in the paper's stricter variant. In eval mode every
layer uses `eval_rank`, and merging folds in that rank: W' = W + (alpha/k) · B[:, :k] A[:k].
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import Method, register
from peftkit.methods.lora import LoraLinear


class DyLoraLinear(LoraLinear):
    """LoRA whose forward uses the first `rank` components: the sampled one in training, `eval_rank` otherwise."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, init: str, eval_rank: int):
        super().__init__(base_layer, r, alpha, dropout, rslora=False, init=init)
        self.alpha = alpha
        self.eval_rank = eval_rank
        self.register_buffer("train_rank", torch.tensor(r, device=base_layer.weight.device))

    def rank(self) -> int:
        return int(self.train_rank) if self.training else self.eval_rank

    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        b = self.eval_rank if rank is None else rank
        return (self.lora_B[:, :b] @ self.lora_A[:b]) * (self.alpha / b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        b = self.rank()
        return y + F.linear(F.linear(self.dropout(x), self.lora_A[:b]), self.lora_B[:, :b]) * (self.alpha / b)


@register
class DyLoRA(Method):
    name = "dylora"
    mergeable = True
    default_roles = ("query", "value", "pooler")

    @dataclasses.dataclass
    class Config:
        r: int = 8
        alpha: float = 16
        eval_rank: int | None = None  # None: r
        dropout: float = 0.0
        init: str = "kaiming"
        target_modules: list[str] | None = None

        def __post_init__(self):
            _checks.at_least("r", self.r)
            _checks.one_of("dylora init", self.init, ("kaiming", "gaussian"))
            if self.eval_rank is not None and not 1 <= self.eval_rank <= self.r:
                raise UserError(f"method.eval_rank must be between 1 and r={self.r} (or null for r), got {self.eval_rank}")
            _checks.positive("alpha", self.alpha)
            _checks.dropout(self.dropout)

    def apply(self, model, exclude):
        super().apply(model, exclude)
        self.draw_rank(model)  # the first step trains at a sampled rank too

    def wrap(self, linear):
        c = self.cfg
        eval_rank = c.r if c.eval_rank is None else c.eval_rank
        return DyLoraLinear(linear, c.r, c.alpha, c.dropout, c.init, eval_rank)

    def after_optimizer_step(self, model, step, total_steps):
        self.draw_rank(model)

    @torch.no_grad()
    def draw_rank(self, model: nn.Module) -> int:
        """Sample the rank every layer trains at in the next step."""
        b = int(torch.randint(1, self.cfg.r + 1, ()))
        for m in model.modules():
            if isinstance(m, DyLoraLinear):
                m.train_rank.fill_(b)
        return b
