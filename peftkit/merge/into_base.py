"""`mode=into_base`: fold one adapter into its base and save a plain transformers model folder.

The merged model is checked against the unmerged adapter on a probe batch before anything is
written; the largest logit difference goes into merge.json.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from peftkit import adapter
from peftkit.errors import UserError
from peftkit.merge import sources
from peftkit.methods.base import merge_into_base

PROBE = ["a merged model must give the same logits", "as the adapter it came from"]


def refuse_unmergeable(path) -> None:
    """Before anything loads: is the adapter's method one whose update is a change of the base weights?"""
    from peftkit.methods import METHODS

    name = adapter.read_config(sources.adapter_dir(path))["method"]["name"]
    if name in METHODS and not METHODS[name].mergeable:
        raise UserError(
            f"method '{name}' ({path}) is not mergeable: its update is not a change of the base "
            f"weights (a nonlinearity, extra tokens or an intervention); load base + adapter with peftkit "
            f"instead (peftkit eval run=...), or train a mergeable method such as lora or ia3"
        )


def probe_batch(processor, task_type: str | None) -> dict:
    """What the merged model's logits are checked on: two sentences, or two images for an image model."""
    from peftkit.tasks import image_classification

    if task_type == image_classification.NAME:
        return image_classification.probe(processor)
    return processor(PROBE, padding=True, return_tensors="pt")


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
    refuse_unmergeable(cfg.adapter)
    a, meta = sources.load(cfg.adapter, cfg.get("backbone_path"))
    net = a.model.eval()
    probe = probe_batch(a.tokenizer, meta.get("task_type"))
    before = net(**probe).logits
    merged = merge_into_base(net)
    diff = (before - merged(**probe).logits).abs().max().item()
    if diff > 1e-3 * max(1.0, before.abs().max().item()):
        raise UserError(f"merging {a.method.name} changed the logits by {diff:.2e}; nothing written (please report this)")
    info = {"mode": "into_base", "adapter": str(sources.adapter_dir(cfg.adapter)), "max_abs_logit_diff": diff}
    sources.write_model(Path(cfg.out), merged, a.tokenizer, {**meta, "merge": info})
    sources.console.print(f"merged {a.method.name} into {meta['backbone']['name']}: {cfg.out} (max |Δlogit| {diff:.2e})")
    return info
