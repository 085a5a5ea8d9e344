"""Adapter folders: `adapter_config.json` plus `adapter.safetensors` with exactly the trained tensors.

The config says how to rebuild the model (backbone, method, task head); the tensors are the
method's parameters and the head. Loading checks the base model's fingerprint, so an adapter is
never silently applied to a different backbone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftkit import __version__
from peftkit.errors import UserError
from peftkit.files import atomic_dir

CONFIG = "adapter_config.json"
WEIGHTS = "adapter.safetensors"


def save(path: Path, model: torch.nn.Module, names: list[str], meta: dict) -> None:
    """`names`: the trained parameters and the method's buffers (`methods.prepare` lists them)."""
    from peftkit.methods.base import adapter_tensors

    params = adapter_tensors(model)
    tensors = {n: params[n].detach().to("cpu").contiguous() for n in names}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "peftkit": __version__})
        (tmp / CONFIG).write_text(json.dumps({"peftkit_version": __version__, **meta}, indent=2) + "\n")


def read_config(path: Path) -> dict:
    path = Path(path)
    f = path / CONFIG
    if not f.is_file():
        raise UserError(f"{path} is not a peftkit adapter folder (no {CONFIG})")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt adapter config {f}: {e}") from None


def load_weights(path: Path, model: torch.nn.Module, names: list[str]) -> None:
    """Copy the adapter's tensors into a model prepared with the same method."""
    from peftkit.methods.base import adapter_tensors

    f = Path(path) / WEIGHTS
    if not f.is_file():
        raise UserError(f"adapter weights {f} are missing")
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt adapter file {f}: {e}; retrain or restore it") from None
    missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise UserError(
            f"adapter {f} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            f"was it trained with another method or backbone?"
        )
    params = adapter_tensors(model)
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise UserError(f"adapter {f}: {name} has shape {tuple(t.shape)}, the model {tuple(params[name].shape)}")
            params[name].copy_(t)
