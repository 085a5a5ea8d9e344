"""`peftkit merge`: fold, combine, compress and exchange adapters.

Each mode is a `run(cfg)` in one module here and one YAML in `configs/merge/` that lists its keys
with their defaults; a merge recipe (`recipes/merge/NAME.yaml`) starts from a mode's YAML and fixes
some keys. What every mode reads and writes (adapters, run folders, model folders) is in `sources`.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
from pathlib import Path

from omegaconf import DictConfig

from peftkit.errors import UserError
from peftkit.files import check_writable, resolved

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
    "materialize": "materialize",  # a multi-task run as one single-task run per task
}


def run(cfg: DictConfig, overwrite: bool = False) -> dict:
    mode = cfg.get("mode")
    if mode not in MODES:
        raise UserError(f"unknown merge mode '{mode}'; choose one of: {', '.join(MODES)}")
    check_output(cfg, overwrite)
    if mode == "to_peft":
        refuse_image_adapter(cfg.adapter)
    return importlib.import_module(f"{__name__}.{MODES[mode]}").run(cfg)


def refuse_image_adapter(path) -> None:
    """peft names no task type for image classifiers, and peftkit's export writes one: refused for now, in one line."""
    from peftkit import adapter
    from peftkit.merge import sources

    if adapter.read_config(sources.adapter_dir(path)).get("task_type") == "image_classification":
        raise UserError(f"to_peft exports text classifiers and causal LMs; {path} is an image classifier, which it does "
                        f"not write yet: use it with peftkit (peftkit eval run=...), or fold it into the base (mode=into_base)")


def check_output(cfg: DictConfig, overwrite: bool) -> None:
    """`out=` never overlaps what the merge reads, and replaces a folder with content only when asked,
    and only if all it holds is an earlier merge's output (peftkit's files, none of the user's)."""
    out = resolved(cfg.out, "out")
    inputs = [(k, cfg.get(k)) for k in ("adapter", "run", "backbone_path")] + [("adapters", a) for a in cfg.get("adapters") or []]
    for key, given in inputs:
        if not given:
            continue
        src = resolved(str(given), key)
        if out == src or out in src.parents or src in out.parents:
            raise UserError(f"out={cfg.out} overlaps the input {given}, which the merge reads; write to a new folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"out={cfg.out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"out={cfg.out} already holds files; choose a new folder, or pass overwrite=true to replace it")
        foreign = not_ours(out)
        if foreign:
            raise UserError(f"out={cfg.out} holds files peftkit did not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); overwrite=true replaces only an earlier merge's "
                            f"output: move them away or choose a new folder")
    check_writable(out, "output folder", "out")
    cfg.out = str(out)  # a symlink to a folder: the folder it names is written, the link stays


# What a merge writes into out= (a model folder, a run-shaped adapter folder, a peft adapter) and what
# `peftkit eval run=OUT` adds: an out= holding anything else holds the user's files too.
OUTPUT_NAMES = {"merge.json", "README.md", "config.yaml", "adapter", "eval", "config.json", "generation_config.json",
                "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model",
                "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                "adapter_config.json", "adapter_model.safetensors"}
EVAL_NAMES = {"report.json", "report.md", "submission"}


def not_ours(out: Path) -> list[str]:
    """What in `out` no merge wrote: the whole folder if no merge wrote it (no merge.json, no peftkit card)."""
    names = sorted(p.name for p in out.iterdir())
    card = out / "README.md"
    ours = (out / "merge.json").is_file() or (card.is_file() and "peftkit" in card.read_text(errors="replace"))
    if not ours:
        return names
    folders = written_folders(out)
    foreign = [n for n in names if n not in OUTPUT_NAMES and n not in folders and not fnmatch.fnmatch(n, "model-*-of-*.safetensors")]
    for n in folders:  # a merge that writes run folders (materialize: one per task): theirs, checked alike
        if (out / n).is_dir():
            foreign += [f"{n}/{x}" for x in not_ours(out / n)]
    if (out / "eval").is_dir():
        foreign += [f"eval/{p.name}" for p in (out / "eval").iterdir() if p.name not in EVAL_NAMES]
    return foreign


def written_folders(out: Path) -> list[str]:
    """The folders an earlier merge's merge.json says it wrote into `out` (`folders`), if any."""
    try:
        folders = json.loads((out / "merge.json").read_text(encoding="utf-8")).get("folders", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in folders if isinstance(f, str) and f and "/" not in f and f not in (".", "..")] if isinstance(folders, list) else []
