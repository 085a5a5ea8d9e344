"""OFT (Qiu et al., 2023): y = W R x + b, with R block-diagonal and orthogonal.

Each b×b block is the Cayley transform R = (I + Q)(I − Q)⁻¹ of a skew-symmetric Q, so R stays exactly
orthogonal whatever Q trains to, and the angles between W's neurons are kept. Only Q's upper triangle
trains (b(b−1)/2 numbers per block); Q = 0 at init, so R = I and the model starts unchanged. R acts
on the input dimension, as in peft (`use_cayley_neumann=False`) and the paper's W' = R W with W
stored in×out. Merges exactly: W' = W R; unmerge multiplies by Rᵀ = R⁻¹.

COFT (`coft`) keeps each Q within a Frobenius ball of radius eps/√(blocks) around 0, projecting
after every optimizer step, so R stays close to the identity.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from peftkit.errors import UserError
from peftkit.methods.base import AdapterLinear, Method, register


class OFTLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, block_size: int):
        super().__init__(base_layer)
        self.block_size = block_size
        n_blocks = self.in_features // block_size
        w = base_layer.weight
        self.oft_q = nn.Parameter(torch.zeros(n_blocks, block_size * (block_size - 1) // 2, dtype=w.dtype, device=w.device))
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=w.device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def skew(self) -> torch.Tensor:
        """Q per block (blocks × b × b), built from the trained upper triangle."""
        n, b = self.oft_q.shape[0], self.block_size
        upper = self.oft_q.new_zeros(n, b, b)
        upper[:, self.rows, self.cols] = self.oft_q
        return upper - upper.transpose(1, 2)

    def rotation(self) -> torch.Tensor:
        """R = (I + Q)(I − Q)⁻¹ per block, solved in fp32 (half-precision solves are unsupported)."""
        q = self.skew().float()
        eye = torch.eye(self.block_size, device=q.device)
        return torch.linalg.solve(eye - q, eye + q).to(self.oft_q.dtype)  # (I−Q)⁻¹ and I+Q commute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        blocks = x.reshape(*x.shape[:-1], -1, self.block_size)
        rotated = torch.einsum("...nk,njk->...nj", blocks, self.rotation().to(x.dtype))
        return self.base_layer(rotated.reshape(x.shape))

    @torch.no_grad()
    def _multiply_weight(self, blocks: torch.Tensor) -> None:
        w = self.base_layer.weight
        per_block = w.reshape(self.out_features, -1, self.block_size).float()
        w.copy_(torch.einsum("onj,njk->onk", per_block, blocks.float()).reshape(w.shape))

    def merge(self) -> None:
        self._multiply_weight(self.rotation())
        self.merged = True

    def unmerge(self) -> None:
        self._multiply_weight(self.rotation().transpose(1, 2))
        self.merged = False

    @torch.no_grad()
    def constrain_(self, eps: float) -> None:
        """COFT: scale any Q with ‖Q‖_F > eps/√(blocks) back onto that sphere."""
        radius = eps / math.sqrt(self.oft_q.shape[0])
        norm = self.skew().norm(dim=(1, 2)).unsqueeze(1)
        self.oft_q.copy_(torch.where(norm <= radius, self.oft_q, self.oft_q * (radius / norm)))


@register
class OFT(Method):
    name = "oft"
    mergeable = True
    default_roles = ("query", "value", "pooler")

    @dataclasses.dataclass
    class Config:
        block_size: int = 32
        r: int = 0  # number of blocks, instead of block_size (as peft: set exactly one of the two)
        coft: bool = False
        eps: float = 6e-5
        target_modules: list[str] | None = None

        def __post_init__(self):
            # whether they divide a target's in_features needs the model: wrap
            if (self.block_size > 0) == (self.r > 0) or min(self.block_size, self.r) < 0:
                raise UserError(f"set exactly one of method.block_size and method.r (the other to 0), got block_size={self.block_size}, r={self.r}")
            if self.block_size == 1:  # a 1×1 block has no angle to train
                raise UserError(f"method.block_size must be at least 2 (or 0 with method.r set), got {self.block_size}")
            if self.coft and self.eps <= 0:
                raise UserError(f"method.eps must be positive with coft, got {self.eps}")

    def wrap(self, linear):
        c = self.cfg
        d = linear.in_features
        if c.r:
            if d % c.r or d // c.r < 2:
                raise UserError(f"method.r={c.r} must divide in_features={d} into blocks of 2 or more; choose one of: {', '.join(map(str, _divisors(d, most=d // 2)))}")
            return OFTLinear(linear, d // c.r)
        if d % c.block_size:
            raise UserError(f"method.block_size={c.block_size} must divide in_features={d}; choose one of: {', '.join(map(str, _divisors(d, least=2)))}")
        return OFTLinear(linear, c.block_size)

    def after_optimizer_step(self, model, step, total_steps):
        if self.cfg.coft:
            for m in model.modules():
                if isinstance(m, OFTLinear):
                    m.constrain_(self.cfg.eps)


def _divisors(n: int, least: int = 1, most: int | None = None) -> list[int]:
    return [k for k in range(least, (most or n) + 1) if n % k == 0]
