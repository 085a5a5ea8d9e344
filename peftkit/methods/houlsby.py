"""Houlsby bottleneck adapters (Houlsby et al., 2019): two per layer, after attention and after FFN.

One more follows an encoder's pooler (dense + tanh on [CLS]), whose pretraining objective may be
unrelated to the task: frozen and unadapted it starves the head (STS-B scored 9.6 without it).

Each sublayer's output h becomes h + W_up σ(W_down h) before the residual and LayerNorm. W_up
starts at zero, so the adapter starts as the identity. The LayerNorms train too, as in the paper.
Not mergeable: σ sits between the two projections.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.activations import ACT2FN

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register


def check_bottleneck(bottleneck: int, activation: str) -> None:
    """The options every bottleneck adapter shares (Houlsby, Pfeiffer, parallel)."""
    _checks.at_least("bottleneck", bottleneck)
    if activation not in ACT2FN:
        raise UserError(f"unknown activation '{activation}'; choose one of: {', '.join(sorted(ACT2FN))}")


def train_layernorms(model: nn.Module) -> None:
    """Houlsby's other trained part: every LayerNorm (RMSNorm in decoders) but the embeddings'."""
    for name, m in model.named_modules():
        if type(m).__name__.endswith(("LayerNorm", "RMSNorm")) and "embed" not in name:
            m.requires_grad_(True)


class BottleneckAdapter(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, bottleneck: int, activation: str, init_std: float):
        super().__init__(base_layer)
        d = self.out_features
        w = base_layer.weight
        self.adapter_down = nn.Linear(d, bottleneck, device=w.device, dtype=w.dtype)
        self.adapter_up = nn.Linear(bottleneck, d, device=w.device, dtype=w.dtype)
        self.act = ACT2FN[activation]
        nn.init.normal_(self.adapter_down.weight, std=init_std)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        return h + self.adapter_up(self.act(self.adapter_down(h)))


@register
class Houlsby(Method):
    name = "houlsby"
    default_roles = ("attn_out", "ffn_out", "pooler")

    @dataclasses.dataclass
    class Config:
        bottleneck: int = 64
        activation: str = "gelu"
        init_std: float = 0.01
        train_layernorm: bool = True
        target_modules: list[str] | None = None

        def __post_init__(self):
            check_bottleneck(self.bottleneck, self.activation)
            # 0 (W_down = W_up = 0 at the start): with relu or gelu (σ(0) = 0) neither gets a gradient
            _checks.positive("init_std", self.init_std)

    def apply(self, model, exclude):
        if self.cfg.train_layernorm:
            train_layernorms(model)
        super().apply(model, exclude)

    def wrap(self, linear):
        c = self.cfg
        return BottleneckAdapter(linear, c.bottleneck, c.activation, c.init_std)
