"""Pfeiffer adapters (Pfeiffer et al., 2021): one bottleneck adapter per layer, after the FFN only.

The configuration AdapterFusion found as good as Houlsby's two adapters at half the parameters:
the FFN output h becomes h + W_up σ(W_down h) before the residual and LayerNorm, with ReLU, and
the LayerNorms stay frozen. W_up starts at zero, so the adapter starts as the identity. Not
mergeable: σ sits between the two projections.

One more follows an encoder's pooler (dense + tanh on [CLS]), as in `houlsby`: pretrained for
another objective, frozen and unadapted it starves the head (Houlsby scored 9.6 on STS-B without it).
"""

from __future__ import annotations

import dataclasses

from transformers.activations import ACT2FN

from peftkit.errors import UserError
from peftkit.methods.base import register
from peftkit.methods.houlsby import Houlsby


def check_bottleneck(bottleneck: int, activation: str) -> None:
    """The options every bottleneck adapter shares, checked before any layer is built."""
    if bottleneck < 1:
        raise UserError(f"method.bottleneck must be at least 1, got {bottleneck}")
    if activation not in ACT2FN:
        raise UserError(f"unknown activation '{activation}'; choose one of: {', '.join(sorted(ACT2FN))}")


@register
class Pfeiffer(Houlsby):
    name = "pfeiffer"
    default_roles = ("ffn_out", "pooler")

    @dataclasses.dataclass
    class Config:
        bottleneck: int = 64
        activation: str = "relu"
        init_std: float = 0.01
        train_layernorm: bool = False
        target_modules: list[str] | None = None

    def wrap(self, linear):
        check_bottleneck(self.cfg.bottleneck, self.cfg.activation)
        return super().wrap(linear)
