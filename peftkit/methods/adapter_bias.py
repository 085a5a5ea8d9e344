"""AdapterBias (Fu et al., 2022): a token-dependent shift of the FFN output, a vector and a Linear.

y = f(x) + (w·x + b) v, where f is the FFN's down projection and x its input: the Linear w (→ 1)
gives each token its own weight for the one shift vector v. As in the authors' code, w reads the
FFN's inner activations and the shift lands on the FFN output, before the residual and LayerNorm;
the LayerNorms train too. v starts at zero, so the layer starts as f. `share_alpha` uses one w for
every layer (the paper's parameter-sharing variant): one per input width, as `tied_lora` shares per
shape. Not mergeable: the shift depends on the token.

An encoder's pooler dense layer (on [CLS], width d) gets its own shift too, as in `houlsby`:
pretrained for another objective, frozen and unadapted it starves the head (Houlsby scored 9.6 on
STS-B without it).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from peftkit.methods.base import AdapterLinear, Method, register, replace_module
from peftkit.methods.ln_tuning import is_norm


class AdapterBiasLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, adapter_alpha: nn.Linear):
        super().__init__(base_layer)
        w = base_layer.weight
        self.adapter_alpha = adapter_alpha  # in_features → 1; may be shared by every layer
        self.adapter_vector = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.adapter_alpha(x) * self.adapter_vector


@register
class AdapterBias(Method):
    name = "adapter_bias"
    default_roles = ("ffn_out", "pooler")

    @dataclasses.dataclass
    class Config:
        share_alpha: bool = False
        train_layernorm: bool = True
        target_modules: list[str] | None = None

    def apply(self, model, exclude):
        if self.cfg.train_layernorm:
            for name, m in model.named_modules():
                if is_norm(m) and "embed" not in name:
                    m.requires_grad_(True)
        alphas: dict[int, nn.Linear] = {}  # with share_alpha, one w per input width (the layers', the pooler's)
        for name, linear in self.targets(model, exclude):
            alpha = alphas.get(linear.in_features) if self.cfg.share_alpha else None
            if alpha is None:
                alpha = alphas[linear.in_features] = _alpha(linear)
            replace_module(model, name, AdapterBiasLinear(linear, alpha))


def _alpha(linear: nn.Linear) -> nn.Linear:
    """The token weight: a Linear to one output with torch's default init, as the authors'."""
    return nn.Linear(linear.in_features, 1, device=linear.weight.device, dtype=linear.weight.dtype)
