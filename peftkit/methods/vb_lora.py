"""VB-LoRA (Li et al., 2024): LoRA whose A and B are assembled from one global vector bank.

y = W x + B A x. The bank holds `num_vectors` vectors of length `vector_length`, shared by every
layer. A's rows and B's columns are cut into sub-vectors of that length; each sub-vector is a
softmax-weighted mix of the `topk` bank vectors its own logits rank highest. Bank and logits train.
Init as the paper: bank U(-0.02, 0.02), logits N(0, 0.1²); the update starts small, not zero.
A dimension the vector length does not divide takes a whole last sub-vector, cut to size (the
paper requires it to divide). Merges exactly: W' = W + B A.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register, replace_module


class VectorBank(nn.Module):
    """The vectors every VB-LoRA layer draws from.

    Each layer holds this one module, so the bank is one tensor in memory, in the optimizer and in
    the adapter file, and stays one after a move to another device or dtype.
    """

    def __init__(self, num_vectors: int, vector_length: int, init_bound: float, like: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(torch.empty(num_vectors, vector_length, dtype=like.dtype, device=like.device))
        nn.init.uniform_(self.vectors, -init_bound, init_bound)

    def mix(self, logits: torch.Tensor, topk: int) -> torch.Tensor:
        """(..., num_vectors) logits -> (..., vector_length): the top-k vectors, softmax-weighted."""
        top, idx = logits.topk(topk, dim=-1)
        return (F.softmax(top, dim=-1).unsqueeze(-1) * self.vectors[idx]).sum(-2)


class VBLoraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, bank: VectorBank, r: int, topk: int, init_logits_std: float):
        super().__init__(base_layer)
        self.bank = bank
        self.topk = topk
        num_vectors, length = bank.vectors.shape
        w = base_layer.weight
        in_chunks, out_chunks = -(-self.in_features // length), -(-self.out_features // length)
        self.vblora_logits_A = nn.Parameter(torch.empty(r, in_chunks, num_vectors, dtype=w.dtype, device=w.device))
        self.vblora_logits_B = nn.Parameter(torch.empty(out_chunks, r, num_vectors, dtype=w.dtype, device=w.device))
        nn.init.normal_(self.vblora_logits_A, std=init_logits_std)
        nn.init.normal_(self.vblora_logits_B, std=init_logits_std)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A: r×in, B: out×r. A's row i is sub-vectors (i, 0..), B's column j is sub-vectors (0.., j)."""
        r = self.vblora_logits_A.shape[0]
        a = self.bank.mix(self.vblora_logits_A, self.topk).reshape(r, -1)[:, : self.in_features]
        b = self.bank.mix(self.vblora_logits_B, self.topk).transpose(1, 2).reshape(-1, r)[: self.out_features]
        return a, b

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return b @ a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        a, b = self.factors()
        return y + F.linear(F.linear(x, a), b)


@register
class VBLoRA(Method):
    name = "vb_lora"
    mergeable = True
    default_roles = ("query", "value", "pooler")

    @dataclasses.dataclass
    class Config:
        r: int = 4
        num_vectors: int = 90
        vector_length: int = 128
        topk: int = 2
        init_bank_bound: float = 0.02
        init_logits_std: float = 0.1
        target_modules: list[str] | None = None

        def __post_init__(self):
            for key in ("r", "num_vectors", "vector_length"):
                _checks.at_least(key, getattr(self, key))
            if not 1 <= self.topk <= self.num_vectors:
                raise UserError(f"method.topk must be between 1 and num_vectors ({self.num_vectors}), got {self.topk}")
            _checks.positive("init_bank_bound", self.init_bank_bound)  # 0: a zero bank, and B A = 0 has no gradient
            _checks.non_negative("init_logits_std", self.init_logits_std)

    def apply(self, model, exclude):
        c = self.cfg
        targets = self.targets(model, exclude)
        bank = VectorBank(c.num_vectors, c.vector_length, c.init_bank_bound, like=targets[0][1].weight)
        for name, linear in targets:
            replace_module(model, name, VBLoraLinear(linear, bank, c.r, c.topk, c.init_logits_std))
