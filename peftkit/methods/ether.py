"""ETHER and ETHER+ (Bini et al., 2024): multiply W by block-diagonal hyperplane reflections.

ETHER: y = W H x + b, H = diag(H_1 … H_n), H_i = I − 2 û_i û_iᵀ with û = u/‖u‖: one vector per block
of the input dimension (the paper's W' = H W with W stored in×out). H is orthogonal and always at
distance ‖H_i − I‖_F = 2 from the identity, which the paper credits for ETHER's robustness to the
learning rate. It is a reflection, never the identity: as in the paper's code, u starts
kaiming-uniform, so the model starts reflected, not unchanged. Merges exactly: W' = W H; H² = I,
so unmerge applies H again.

ETHER+ relaxes each block to H⁺ = I − û ûᵀ + v̂ v̂ᵀ (not orthogonal, ‖H⁺ − I‖_F ≤ √2) and applies it
on both sides, as in the paper: y = H⁺_out W H⁺_in x + b (the bias is not transformed). v starts
equal to u, so H⁺ = I and the model starts unchanged. Merges as W' = H⁺_out W H⁺_in; unmerge
restores a copy of W kept while merged, as H⁺ can be near-singular (û ⟂ v̂).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register


def _blocks(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], n_blocks, -1)


def _component(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(x·û) û per block: x is (…, n, k), u is (n, k)."""
    u_hat = u / u.norm(dim=-1, keepdim=True)
    return (x * u_hat).sum(-1, keepdim=True) * u_hat


def reflect(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """H x per block, H = I − 2 û ûᵀ, without forming H."""
    xb = _blocks(x, u.shape[0])
    return (xb - 2 * _component(xb, u)).reshape(x.shape)


def relaxed_reflect(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H⁺ x per block, H⁺ = I − û ûᵀ + v̂ v̂ᵀ, without forming H⁺."""
    xb = _blocks(x, u.shape[0])
    return (xb - _component(xb, u) + _component(xb, v)).reshape(x.shape)


def _reflection_vectors(n_blocks: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    u = torch.empty(n_blocks, dim // n_blocks, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(u, a=math.sqrt(5))  # as the paper's code; only û's direction matters
    return u


class EtherLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, n_blocks: int):
        super().__init__(base_layer)
        self.ether_u = nn.Parameter(_reflection_vectors(n_blocks, self.in_features, base_layer.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return self.base_layer(reflect(x, self.ether_u))

    @torch.no_grad()
    def _reflect_weight(self) -> None:
        w = self.base_layer.weight  # W H: each row reflected, as H is symmetric
        w.copy_(reflect(w.float(), self.ether_u.float()))

    def merge(self) -> None:
        self._reflect_weight()
        self.merged = True

    def unmerge(self) -> None:
        self._reflect_weight()
        self.merged = False


class EtherPlusLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, n_blocks: int):
        super().__init__(base_layer)
        w = base_layer.weight
        self.ether_u_in = nn.Parameter(_reflection_vectors(n_blocks, self.in_features, w))
        self.ether_v_in = nn.Parameter(self.ether_u_in.detach().clone())
        self.ether_u_out = nn.Parameter(_reflection_vectors(n_blocks, self.out_features, w))
        self.ether_v_out = nn.Parameter(self.ether_u_out.detach().clone())
        self.weight_before_merge = None  # a copy kept while merged: see `unmerge`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        h = F.linear(relaxed_reflect(x, self.ether_u_in, self.ether_v_in), self.base_layer.weight)
        h = relaxed_reflect(h, self.ether_u_out, self.ether_v_out)
        return h if self.base_layer.bias is None else h + self.base_layer.bias

    @torch.no_grad()
    def merge(self) -> None:
        """W ← H⁺_out W H⁺_in, keeping a copy of W for `unmerge`: H⁺ is not orthogonal and becomes
        ill-conditioned as û and v̂ turn apart (singular when û ⟂ v̂), so inverting it after training
        does not give W back to fp32 precision."""
        w = self.base_layer.weight
        rows_done = relaxed_reflect(w.float(), self.ether_u_in.float(), self.ether_v_in.float())  # W H⁺_in (H⁺ symmetric)
        both = relaxed_reflect(rows_done.T, self.ether_u_out.float(), self.ether_v_out.float()).T  # H⁺_out (W H⁺_in)
        self.weight_before_merge = w.detach().clone()
        w.copy_(both)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self.base_layer.weight.copy_(self.weight_before_merge)
        self.weight_before_merge = None
        self.merged = False


def _check_blocks(n_blocks: int, dims: dict[str, int]) -> None:
    """Each block needs 2 or more features: a 1-feature reflection is a constant ±1 that cannot train."""
    for what, d in dims.items():
        if d % n_blocks or d // n_blocks < 2:
            valid = [k for k in range(1, min(dims.values()) // 2 + 1) if all(e % k == 0 and e // k >= 2 for e in dims.values())]
            raise UserError(f"method.n_blocks={n_blocks} must split {what}={d} into equal blocks of 2 or more; "
                            f"choose one of: {', '.join(map(str, valid))}")


@register
class Ether(Method):
    name = "ether"
    mergeable = True
    default_roles = ("query", "value", "pooler")

    @dataclasses.dataclass
    class Config:
        n_blocks: int = 4
        target_modules: list[str] | None = None

        def __post_init__(self):
            _checks.at_least("n_blocks", self.n_blocks)  # whether it splits a target evenly: wrap

    def wrap(self, linear):
        _check_blocks(self.cfg.n_blocks, {"in_features": linear.in_features})
        return EtherLinear(linear, self.cfg.n_blocks)


@register
class EtherPlus(Method):
    name = "ether_plus"
    mergeable = True
    default_roles = ("query", "value", "pooler")

    Config = Ether.Config

    def wrap(self, linear):
        _check_blocks(self.cfg.n_blocks, {"in_features": linear.in_features, "out_features": linear.out_features})
        return EtherPlusLinear(linear, self.cfg.n_blocks)
