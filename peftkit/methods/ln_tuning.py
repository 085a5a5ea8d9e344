"""LN tuning (Qi et al., 2022): only the LayerNorm (or RMSNorm) gains and biases train.

The norms are a few thousand parameters that rescale and shift every hidden state, which is
enough to adapt a pretrained model to many tasks. Nothing is added, so there is nothing to merge:
the trained model is already a plain model.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from peftkit.errors import UserError
from peftkit.methods.base import Method, register
from peftkit.methods.targets import matches


def is_norm(module: nn.Module) -> bool:
    """LayerNorm and RMSNorm under any architecture's class name (LlamaRMSNorm, T5LayerNorm, ...)."""
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def find_norms(model: nn.Module, target_modules: list[str] | None, exclude: list[str]) -> list[tuple[str, nn.Module]]:
    """The norm modules to train: by name, dotted suffix or regex, or every norm outside the head."""
    norms = [(n, m) for n, m in model.named_modules()
             if is_norm(m) and not any(n == e or n.startswith(e + ".") for e in exclude)]
    found = [(n, m) for n, m in norms if target_modules is None or any(matches(n, p) for p in target_modules)]
    if not found:
        names = sorted({re.sub(r"\.\d+\.", ".N.", n) for n, _ in norms})
        raise UserError(f"target_modules {target_modules} match no norm layer; this model has: {', '.join(names) or 'none'}")
    return found


@register
class LNTuning(Method):
    name = "ln_tuning"
    mergeable = True  # nothing to fold: the trained norms are part of the plain model

    @dataclasses.dataclass
    class Config:
        target_modules: list[str] | None = None

        def __post_init__(self):
            # whether the names match a norm of the model: find_norms
            if self.target_modules == []:
                raise UserError("method.target_modules=[] names no norm layer to train; list names, suffixes or regexes, "
                                "or null for every norm")

    def apply(self, model, exclude):
        for _, norm in find_norms(model, self.cfg.target_modules, exclude):
            norm.requires_grad_(True)
