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

from peftkit.methods.base import register
from peftkit.methods.houlsby import Houlsby


@register
class Pfeiffer(Houlsby):
    name = "pfeiffer"
    default_roles = ("ffn_out", "pooler")

    @dataclasses.dataclass
    class Config(Houlsby.Config):  # Houlsby's options and checks, other defaults
        activation: str = "relu"
        train_layernorm: bool = False
