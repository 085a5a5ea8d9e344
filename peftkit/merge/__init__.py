"""`peftkit merge`: fold, combine, compress and exchange adapters.

Each mode is a `run(cfg)` in one module here and one YAML in `configs/merge/` that lists its keys
with their defaults; a merge recipe (`recipes/merge/NAME.yaml`) starts from a mode's YAML and fixes
some keys. What every mode reads and writes (adapters, run folders, model folders) is in `sources`.
"""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from peftkit.errors import UserError

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


def run(cfg: DictConfig) -> dict:
    mode = cfg.get("mode")
    if mode not in MODES:
        raise UserError(f"unknown merge mode '{mode}'; choose one of: {', '.join(MODES)}")
    return importlib.import_module(f"{__name__}.{MODES[mode]}").run(cfg)
