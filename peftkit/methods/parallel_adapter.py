"""Parallel adapter (He et al., 2022): a scaled bottleneck beside a frozen Linear, reading its input.

y = f(x) + s · W_up σ(W_down x), where f is the wrapped Linear and x its input. He et al. put the
adapter beside the whole FFN block; wrapping Linears, the default puts it beside the FFN's down
projection (ffn_out): it reads the FFN's inner activations instead of the block's input, and adds
to the same place, the FFN output before the residual. W_down is Kaiming-uniform and W_up zero, so
the layer starts as f. Not mergeable: σ sits between the two projections.

One more sits beside an encoder's pooler dense layer (reading [CLS], width d), as in `houlsby`:
pretrained for another objective, frozen and unadapted it starves the head (Houlsby scored 9.6 on
STS-B without it).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from transformers.activations import ACT2FN

from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register
from peftkit.methods.houlsby import check_bottleneck


class ParallelAdapterLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, bottleneck: int, scaling: float, activation: str):
        super().__init__(base_layer)
        w = base_layer.weight
        self.scaling = scaling
        self.adapter_down = nn.Linear(self.in_features, bottleneck, device=w.device, dtype=w.dtype)
        self.adapter_up = nn.Linear(bottleneck, self.out_features, device=w.device, dtype=w.dtype)
        self.act = ACT2FN[activation]
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scaling * self.adapter_up(self.act(self.adapter_down(x)))


@register
class ParallelAdapter(Method):
    name = "parallel_adapter"
    default_roles = ("ffn_out", "pooler")

    @dataclasses.dataclass
    class Config:
        bottleneck: int = 64
        scaling: float = 4.0
        activation: str = "relu"
        target_modules: list[str] | None = None

        def __post_init__(self):
            check_bottleneck(self.bottleneck, self.activation)
            _checks.positive("scaling", self.scaling)  # 0: the adapter adds 0 · (…), and nothing in it gets a gradient

    def wrap(self, linear):
        c = self.cfg
        return ParallelAdapterLinear(linear, c.bottleneck, c.scaling, c.activation)
