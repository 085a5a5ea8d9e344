"""VeRA (Kopiczko et al., 2024): y = W x + Λ_b B Λ_d A x, with A and B frozen, random and shared.

One pair A: r×in_max, B: out_max×r serves the whole model; each layer uses the slices A[:, :in] and
B[:out, :] and trains only its two scaling vectors d (r) and b (out). A and B are kaiming-uniform
from `projection_seed` and saved with the adapter. b starts at 0, so the model starts unchanged.
Merges exactly: W' = W + Λ_b B Λ_d A.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register, replace_module


class VeraProjections(nn.Module):
    """The frozen random A and B every VeRA layer shares.

    Each layer holds this one module (not copies of its tensors), so moving the model to another
    device or dtype keeps a single A and B.
    """

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, like: torch.Tensor):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("vera_A", _kaiming_uniform((r, in_max), g).to(like.device, like.dtype))
        self.register_buffer("vera_B", _kaiming_uniform((out_max, r), g).to(like.device, like.dtype))


def _kaiming_uniform(shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """U(-√(6/fan_in), √(6/fan_in)) drawn from `g` on the CPU: the same numbers on every machine."""
    bound = math.sqrt(6 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


class VeraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, projections: VeraProjections, d_initial: float):
        super().__init__(base_layer)
        self.projections = projections
        w = base_layer.weight
        r = projections.vera_A.shape[0]
        self.vera_lambda_d = nn.Parameter(torch.full((r,), d_initial, dtype=w.dtype, device=w.device))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=w.dtype, device=w.device))

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projections.vera_A[:, : self.in_features], self.projections.vera_B[: self.out_features, :]

    def delta_weight(self) -> torch.Tensor:
        a, b = self.sliced()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        a, b = self.sliced()
        return y + self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)


@register
class VeRA(Method):
    name = "vera"
    mergeable = True
    default_roles = ("query", "value", "pooler")

    @dataclasses.dataclass
    class Config:
        r: int = 256
        projection_seed: int = 0
        d_initial: float = 0.1
        target_modules: list[str] | None = None

        def __post_init__(self):
            _checks.at_least("r", self.r)
            if not -(2**63) <= self.projection_seed < 2**64:  # what torch.Generator.manual_seed takes
                raise UserError(f"method.projection_seed must be between -2^63 and 2^64 - 1, got {self.projection_seed}")
            if self.d_initial == 0:
                raise UserError(f"method.d_initial must not be 0 (b starts at 0, so neither b nor d would get a gradient), got {self.d_initial}")

    def apply(self, model, exclude):
        c = self.cfg
        targets = self.targets(model, exclude)
        in_max = max(linear.in_features for _, linear in targets)
        out_max = max(linear.out_features for _, linear in targets)
        projections = VeraProjections(c.r, in_max, out_max, c.projection_seed, like=targets[0][1].weight)
        for name, linear in targets:
            replace_module(model, name, VeraLinear(linear, projections, c.d_initial))
