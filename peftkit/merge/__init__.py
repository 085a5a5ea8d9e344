"""`peftkit merge`: fold, combine, compress and exchange adapters.

Each mode is a `run(cfg)` in one module here and one YAML in `configs/merge/` that lists its keys
with their defaults; a merge recipe (`recipes/merge/NAME.yaml`) starts from a mode's YAML and fixes
some keys. What every mode reads and writes (adapters, run folders, model folders) is in `sources`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig

from peftkit.errors import UserError
from peftkit.files import check_writable

MODES = {
    "into_base": "into_base",  # fold one adapter into its base: a plain transformers folder
    "task_arithmetic": "combine",  # base + Σ w·τ over adapters' task vectors
    "ties": "combine",
    "dare": "combine",
    "concat": "lora",  # LoRA adapters side by side: one LoRA of rank Σr, exact
    "svd": "lora",  # any mergeable adapters' summed ΔW, truncated to a rank-r LoRA
    "mwa": "checkpoints",  # average one run's kept checkpoints, weighted by loss or step
    "compress": "compress",  # ComPEFT: top-k% of the task vector, ternarised
    "to_peft": "peft_format",  # write a LoRA-family adapter in Hugging Face peft's format
    "from_peft": "peft_format",  # read a peft LoRA / IA³ adapter as a peftkit adapter
}


def run(cfg: DictConfig, overwrite: bool = False) -> dict:
    mode = cfg.get("mode")
    if mode not in MODES:
        raise UserError(f"unknown merge mode '{mode}'; choose one of: {', '.join(MODES)}")
    check_output(cfg, overwrite)
    return importlib.import_module(f"{__name__}.{MODES[mode]}").run(cfg)


def check_output(cfg: DictConfig, overwrite: bool) -> None:
    """`out=` never overlaps what the merge reads, and replaces a folder with content only when asked."""
    out = Path(cfg.out).expanduser().resolve()
    inputs = [cfg.get(k) for k in ("adapter", "run", "backbone_path")] + list(cfg.get("adapters") or [])
    for given in filter(None, inputs):
        src = Path(str(given)).expanduser().resolve()
        if out == src or out in src.parents or src in out.parents:
            raise UserError(f"out={cfg.out} overlaps the input {given}, which the merge reads; write to a new folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"out={cfg.out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"out={cfg.out} already holds files; choose a new folder, or pass overwrite=true to replace it")
    check_writable(out, "output folder", "out")
