"""BitFit (Ben Zaken et al., 2022): only the bias terms train.

Every bias of the backbone by default: the Linears' and the LayerNorms' (as the paper's `all`).
`bias_names` restricts it, e.g. to [query, ffn_in], the paper's ablation that trains the query and
FFN-in biases alone. Nothing is added, so there is nothing to merge. Models without biases (Llama
and most decoders) cannot use it.
"""

from __future__ import annotations

import dataclasses
import re

from peftkit.errors import UserError
from peftkit.methods.base import Method, register
from peftkit.methods.targets import candidate_layers, matches, roles_of


@register
class BitFit(Method):
    name = "bitfit"
    mergeable = True  # nothing to fold: the trained biases are part of the plain model

    @dataclasses.dataclass
    class Config:
        # Modules whose bias trains: role names (query, ffn_in, ...) or module names, suffixes, regexes.
        bias_names: list[str] | None = None

        def __post_init__(self):
            # whether the names match a bias of the model: apply
            if self.bias_names == []:
                raise UserError("method.bias_names=[] names no bias to train; list roles or modules, e.g. [query,ffn_in], "
                                "or null for every bias")

    def apply(self, model, exclude):
        biases = {n.removesuffix(".bias"): p for n, p in model.named_parameters()
                  if n.endswith(".bias") and not any(n.startswith(e + ".") for e in exclude)}
        if not biases:
            raise UserError(f"bitfit trains bias terms and this {model.config.model_type} model has none; "
                            f"use ln_tuning, lora or another method")
        wanted = self.cfg.bias_names
        if wanted is not None:
            roles = roles_of(candidate_layers(model, exclude))
            names = {n for w in wanted for n in roles.get(w, [])}
            biases = {n: p for n, p in biases.items() if n in names or any(matches(n, w) for w in wanted)}
            if not biases:
                owners = sorted({re.sub(r"\.\d+\.", ".N.", n.removesuffix(".bias"))
                                 for n, _ in model.named_parameters() if n.endswith(".bias")})
                raise UserError(f"bias_names {wanted} match no bias; roles: {', '.join(roles) or 'none'}; "
                                f"modules with a bias: {', '.join(owners)}")
        for p in biases.values():
            p.requires_grad_(True)
