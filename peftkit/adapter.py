"""Adapter folders: `adapter_config.json`, `adapter.safetensors` with exactly the trained tensors,
and a model card (`README.md`) with the metadata the Hugging Face Hub reads.

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
from peftkit.files import atomic_dir, newest_complete

CONFIG = "adapter_config.json"
WEIGHTS = "adapter.safetensors"
CARD = "README.md"


def save(path: Path, model: torch.nn.Module, names: list[str], meta: dict) -> None:
    """`names`: the trained parameters and the method's buffers (`methods.prepare` lists them)."""
    from peftkit.methods.base import adapter_tensors

    params = adapter_tensors(model)
    save_tensors(path, {n: params[n] for n in names}, meta)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict, weights: str = WEIGHTS) -> None:
    """Write an adapter folder from its tensors and `meta` (what `model.meta` returns, plus metrics).

    `weights`: the tensors' file name; a compressed adapter's differs (`merge.compress.WEIGHTS`).
    """
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    refuse_nonfinite(tensors, path)
    meta = {"peftkit_version": __version__, **meta}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / weights), metadata={"format": "pt", "peftkit": __version__})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / CARD).write_text(model_card(meta, size_bytes=(tmp / weights).stat().st_size))


# a task type's Hub pipeline tag, and the transformers class that loads a merged model of it
TASK_CARDS = {"classification": ("text-classification", "AutoModelForSequenceClassification"),
              "causal_lm": ("text-generation", "AutoModelForCausalLM"),
              "image_classification": ("image-classification", "AutoModelForImageClassification")}


def model_card(meta: dict, size_bytes: int | None = None, kind: str = "adapter", library: str | None = None,
               usage: str | None = None) -> str:
    """A Hub model card: YAML metadata (base model, library, tags, metrics) and a short summary.

    `kind` is "adapter" or "model" (a merged, plain transformers folder); `library` and `usage`
    (how to load it) default to peftkit's for an adapter and transformers' for a model.
    """
    method = meta.get("method", {}).get("name", "?")
    bb = meta.get("backbone", {})
    hub_id = None if bb.get("path") else bb.get("hub_id")  # a local path may hold any weights
    base = hub_id or bb.get("path") or bb.get("name", "?")
    dataset = meta.get("dataset") or "?"
    labels = meta.get("label_names")
    lines = ["---"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    library = library or ("peftkit" if kind == "adapter" else "transformers")
    pipeline, auto_class = TASK_CARDS.get(meta.get("task_type"), TASK_CARDS["classification"])
    lines += [f"library_name: {library}", f"pipeline_tag: {pipeline}", "tags:", "  - peftkit", f"  - {method}"]
    if kind == "model":
        lines.append("  - merged")
    if dataset.startswith("glue/"):
        lines += ["datasets:", "  - nyu-mll/glue"]
    metrics = meta.get("metrics", {}).get("validation") or next(iter(meta.get("metrics", {}).values()), {})
    if metrics:
        lines += ["model-index:", f"  - name: {method}-{bb.get('name', 'model')}-{dataset.replace('/', '-')}", "    results:",
                  "      - task:", f"          type: {pipeline}", "        dataset:", f"          name: {dataset}",
                  f"          type: {dataset.split('/')[0]}", "          split: validation", "        metrics:"]
        lines += [f"          - type: {k}\n            value: {v:.4g}" for k, v in metrics.items()]
    lines.append("---")
    n, total = meta.get("trainable_params"), meta.get("total_params")
    rows = [("method", method), ("base model", base), ("dataset", dataset),
            ("labels", ", ".join(labels) if labels else "regression (one score)")]
    if n and total:
        rows.append(("trainable params", f"{n:,} ({100 * n / total:.3f}% of {total:,})"))
    if size_bytes is not None:
        rows.append((f"{kind} size", f"{size_bytes / 1e6:.2f} MB"))
    rows += [(f"dev {k}", f"{v:.2f}") for k, v in metrics.items()]
    if meta.get("merge"):
        rows.append(("made by", f"peftkit merge mode={meta['merge'].get('mode')}"))
    rows.append(("peftkit version", meta.get("peftkit_version", __version__)))
    what = "adapter" if kind == "adapter" else "model (adapter merged into its base)"
    body = [f"# {method} {what}: {bb.get('name', base)} on {dataset}", "", "| | |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in rows]
    if usage is None and kind == "adapter":
        usage = ("Load it with peftkit (`peftkit eval run=<run dir>`), or fold it into the base where the method is "
                 "mergeable: `peftkit merge adapter=<this folder> out=merged/`.")
    elif usage is None:
        usage = f"A plain transformers model: `{auto_class}.from_pretrained(<this folder>)`."
    body += ["", usage]
    return "\n".join(lines + [""] + body) + "\n"


def folder(path: str | Path) -> Path:
    """The adapter folder of a run directory (the newest complete copy, should a kill have interrupted
    a save) or an adapter folder itself."""
    path = Path(path)
    inner = newest_complete(path / "adapter")
    if inner is not None and (inner / CONFIG).is_file():
        return inner
    if (path / CONFIG).is_file():
        return path
    raise UserError(f"{path} is neither an adapter folder nor a run directory holding adapter/ (no {CONFIG})")


def read_config(path: Path, model: bool = False) -> dict:
    """adapter_config.json, checked; `model`: with all that rebuilding base + adapter reads."""
    path = Path(path)
    f = path / CONFIG
    if not f.is_file():
        raise UserError(f"{path} is not a peftkit adapter folder (no {CONFIG})")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"corrupt adapter config {f}: {e}") from None
    if isinstance(data, dict) and "peft_type" in data:
        raise UserError(f"{path} is already a peft adapter (Hugging Face peft's format), not a peftkit one; import it with "
                        f"peftkit merge mode=from_peft adapter={path} out=DIR")
    from peftkit import schema

    return schema.check_file(schema.AdapterFile, data, f, "adapter config", "retrain or restore it",
                             schema.ADAPTER_MODEL_KEYS if model else ())


FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def read_tensors(f: Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or one line saying the `what` is missing, corrupt, of an
    unexpected dtype or holding NaN / infinity, and `fix`."""
    f = Path(f)
    if not f.is_file():
        raise UserError(f"{what} {f} is missing; {fix}")
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt {what} {f}: {e}; {fix}") from None
    odd = [f"{n} ({t.dtype})" for n, t in tensors.items() if t.dtype not in FLOATS + INTEGERS]
    if odd:
        raise UserError(f"{what} {f} holds tensors of an unexpected dtype: {', '.join(odd[:3])}; {fix}")
    if bad := nonfinite(tensors):
        raise UserError(f"{what} {f} holds NaN or infinity in {len(bad)} tensors (first: {bad[0]}); "
                        f"it comes from a diverged run: retrain with a lower trainer.lr")
    return tensors


def refuse_nonfinite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Nothing that holds NaN or infinity is written as an adapter or a model."""
    if bad := nonfinite(tensors):
        raise UserError(f"not writing {path}: {len(bad)} tensors hold NaN or infinity (first: {bad[0]}); "
                        f"the inputs or weights diverged")


def nonfinite(tensors: dict[str, torch.Tensor], names: list[str] | None = None) -> list[str]:
    """The names of the floating tensors that hold NaN or infinity."""
    return [n for n in (tensors if names is None else names)
            if tensors[n].is_floating_point() and not torch.isfinite(tensors[n]).all()]


def load_weights(path: Path, model: torch.nn.Module, names: list[str]) -> None:
    """Copy the adapter's tensors into a model prepared with the same method."""
    from peftkit.methods.base import adapter_tensors

    f = Path(path) / WEIGHTS
    tensors = read_tensors(f, "adapter file", "retrain or restore it")
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
            if t.is_floating_point() != params[name].is_floating_point():
                raise UserError(f"adapter {f}: {name} is {t.dtype}, the model's {params[name].dtype}; was it written by another tool?")
            params[name].copy_(t)
