"""What merge modes read and write: adapter folders, run folders, plain model folders.

An input may be a run directory (`outputs/.../`) or the adapter folder inside it. An adapter a
mode writes goes into a run-shaped folder (`OUT/adapter/` plus `OUT/config.yaml` from the source
run, with the new method), so `peftkit eval run=OUT` scores it like any trained run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console

from peftkit import adapter, model
from peftkit.errors import UserError
from peftkit.files import atomic_dir

console = Console()


adapter_dir = adapter.folder


def run_dir(path: str | Path) -> Path | None:
    """The run directory an input belongs to, if it is one (its config.yaml says how it trained)."""
    a = adapter_dir(path)
    return a.parent if (a.parent / "config.yaml").is_file() else None


def load(path: str | Path, backbone_path: str | None = None) -> tuple[model.Adapted, dict]:
    """Base + adapter, rebuilt; the base's fingerprint must match the adapter's."""
    return model.from_adapter(adapter_dir(path), backbone_path)


def check_same_base(paths: list, configs: list[dict]) -> None:
    first = configs[0]["base_fingerprint"]
    for p, c in zip(paths[1:], configs[1:]):
        if c["base_fingerprint"] != first:
            raise UserError(
                f"{p} was trained on another base ({c['backbone']['name']}, fingerprint {c['base_fingerprint']}) than "
                f"{paths[0]} ({configs[0]['backbone']['name']}, {first}); combine adapters of one base model"
            )


def write_model(out: Path, net: torch.nn.Module, tokenizer, meta: dict) -> None:
    """A plain transformers folder (config, weights, tokenizer or image processor), its model card and merge.json."""
    adapter.refuse_nonfinite(dict(net.state_dict()), out)
    with atomic_dir(Path(out)) as tmp:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "merge.json").write_text(json.dumps(meta.get("merge", {}), indent=2) + "\n")
        (tmp / adapter.CARD).write_text(adapter.model_card(meta, kind="model"))


def write_adapter_run(out: Path, tensors: dict[str, torch.Tensor], meta: dict, source: Path | None, dataset=None) -> None:
    """`OUT/adapter/` from tensors + meta, and `OUT/config.yaml` from the source run with meta's method
    (and `dataset` as its dataset, when given: one task of a multi-task run)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        adapter.save_tensors(tmp / "adapter", tensors, meta)
        if source is not None and (source / "config.yaml").is_file():
            cfg = OmegaConf.load(source / "config.yaml")
            cfg.method = meta["method"]
            if dataset is not None:
                cfg.dataset = dataset
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (tmp / "merge.json").write_text(json.dumps(meta.get("merge", {}), indent=2) + "\n")
