"""(IA)³ (Liu et al., 2022): learned vectors rescale keys, values and the FFN's inner activations.

Keys and values: y = l ⊙ (W x + b). FFN: the down projection sees l ⊙ h, i.e. y = W (l ⊙ h) + b.
Every l starts at 1, so the model starts unchanged. Merges exactly by scaling W's rows or columns.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from peftkit.methods.base import AdapterLinear, Method, register, replace_module
from peftkit.methods.targets import candidate_layers, matches, roles_of


class IA3Linear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, on_input: bool):
        super().__init__(base_layer)
        self.on_input = on_input
        n = self.in_features if on_input else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, dtype=base_layer.weight.dtype, device=base_layer.weight.device))

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        if self.on_input:
            return self.base_layer(x * self.ia3_l)
        return self.base_layer(x) * self.ia3_l

    @torch.no_grad()
    def _scale(self, factor: torch.Tensor) -> None:
        w, b = self.base_layer.weight, self.base_layer.bias
        if self.on_input:
            w *= factor[None, :]
        else:
            w *= factor[:, None]
            if b is not None:
                b *= factor

    def merge(self):
        self._scale(self.ia3_l)
        self.merged = True

    def unmerge(self):
        self._scale(1 / self.ia3_l)
        self.merged = False


class IA3Embedding(AdapterLinear):
    """(IA)³ on an embedding table: every token's vector scaled, y = l ⊙ E[x]; merges as E ⊙ l per row."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        w = base_layer.weight
        self.ia3_l = nn.Parameter(torch.ones(base_layer.embedding_dim, dtype=w.dtype, device=w.device))

    def forward(self, x):
        y = self.base_layer(x)
        return y if self.merged else y * self.ia3_l

    def merge(self):
        with torch.no_grad():
            self.base_layer.weight *= self.ia3_l[None, :]
        self.merged = True

    def unmerge(self):
        with torch.no_grad():
            self.base_layer.weight /= self.ia3_l[None, :]
        self.merged = False


@register
class IA3(Method):
    name = "ia3"
    mergeable = True
    default_roles = ("key", "value", "ffn_out", "pooler")
    embeddings = True

    @dataclasses.dataclass
    class Config:
        target_modules: list[str] | None = None
        # Which targets are FFN down projections (scaled on their input); by default the ffn_out role.
        feedforward_modules: list[str] | None = None

    def apply(self, model, exclude):
        targets = self.targets(model, exclude)
        if self.cfg.feedforward_modules is None:  # the targets in the ffn_out role, by name: the adapter file records them
            down = set(roles_of(candidate_layers(model, exclude)).get("ffn_out", []))
            self.cfg.feedforward_modules = [n for n, _ in targets if n in down]
        ffn = self.cfg.feedforward_modules
        for name, linear in targets:
            if isinstance(linear, nn.Embedding):
                replace_module(model, name, IA3Embedding(linear))
                continue
            replace_module(model, name, IA3Linear(linear, on_input=any(matches(name, p) for p in ffn)))
