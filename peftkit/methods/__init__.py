"""The method registry. Every method module in this folder registers one method on import.

Adding a method is one module here (a `Method` subclass under `@register`) and one YAML in
`configs/method/`. Modules whose name starts with `_` are helpers (`_checks`: the option checks that
need no model) and register nothing.
"""

from __future__ import annotations

import importlib
import pkgutil

from peftkit.config import method_options
from peftkit.errors import UserError
from peftkit.methods.base import METHODS, AdapterLinear, Method, prepare, register

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")


def build(cfg: dict) -> Method:
    """The method a `method:` config section names, with its fields checked."""
    name = cfg.get("name")
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name](method_options(cfg))


__all__ = ["METHODS", "AdapterLinear", "Method", "build", "prepare", "register"]
