"""Backbone + method = the model a run trains, evaluates or merges."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from peftkit import adapter, backbone, methods, tasks
from peftkit.errors import UserError
from peftkit.methods.base import count_params


@dataclass
class Adapted:
    model: nn.Module
    tokenizer: object  # the task's preprocessor (`tasks.*.load_processor`): a tokenizer, or an image processor
    method: methods.Method
    trainable: list[str]  # what the adapter file holds: trained parameters, then the method's buffers
    head: list[str]  # head module names
    fingerprint: str  # of the frozen base weights

    def summary(self) -> str:
        n, total = count_params(self.model)
        return f"trainable params: {n:,} ({100 * n / total:.2f}% of {total:,})"


def build(backbone_cfg: DictConfig, method_cfg, label_names: list[str] | None, task: str | None = None) -> Adapted:
    """Load the backbone as the task type needs it (`tasks`: a fresh classification head, or the
    causal LM as pretrained), with its preprocessor, and apply the method."""
    method = methods.build(OmegaConf.to_container(method_cfg, resolve=True) if isinstance(method_cfg, DictConfig) else method_cfg)
    tasks.check_method(task, method.name)
    kind = tasks.get(task)
    processor = kind.load_processor(backbone_cfg)
    model = kind.load_model(backbone_cfg, label_names)
    head = backbone.head_module_names(model, list(backbone_cfg.head))
    base_names = [n for n, _ in model.named_parameters() if not any(n.startswith(h + ".") for h in head)]
    fp = backbone.fingerprint(model, base_names)
    trainable = methods.prepare(model, method, head)
    return Adapted(model, processor, method, trainable, head, fp)


def meta(a: Adapted, backbone_cfg: DictConfig, label_names, dataset: str, task: str | None = None) -> dict:
    """adapter_config.json: the task type, the method's options as applied (default targets resolved
    to names), the backbone, the base's fingerprint, labels and head, sizes."""
    n, total = count_params(a.model)
    return {
        "task_type": task or tasks.DEFAULT,
        "method": {"name": a.method.name, **dataclasses.asdict(a.method.cfg)},
        "backbone": OmegaConf.to_container(backbone_cfg, resolve=True),
        "base_fingerprint": a.fingerprint,
        "dataset": dataset,
        "label_names": label_names,
        "head": a.head,
        "trainable_params": n,
        "total_params": total,
    }


def from_adapter(path: str | Path, backbone_path: str | None = None) -> tuple[Adapted, dict]:
    """Rebuild base + adapter from an adapter folder; refuse a base with another fingerprint.

    A compressed adapter (`peftkit merge mode=compress`) stores its change from the initial
    weights: seeded as in training, `build` recreates them, and its loader adds the change.
    """
    cfg = adapter.read_config(path, model=True)
    load_weights = adapter.load_weights
    if "compression" in cfg:
        from peftkit.merge import compress

        compress.seed_init(cfg, path)
        load_weights = compress.load_weights
    bb = OmegaConf.create(cfg["backbone"])
    if backbone_path:
        bb.path = backbone_path
    a = build(bb, cfg["method"], cfg["label_names"], cfg.get("task_type"))
    if a.fingerprint != cfg["base_fingerprint"]:
        raise UserError(
            f"adapter {path} was trained on backbone '{cfg['backbone']['name']}' (fingerprint "
            f"{cfg['base_fingerprint']}); the base loaded here differs ({a.fingerprint}): pass the same base weights"
        )
    load_weights(path, a.model, a.trainable)
    return a, cfg
