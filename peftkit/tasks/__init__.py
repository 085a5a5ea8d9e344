"""Task types: what a run learns decides how its model loads, how its data is encoded and batched,
its loss and its evaluation. The trainer, checkpoints, reports, sweeps and merges see only this
interface, one module per task type:

    load_data(dataset_cfg, splits)              -> data: .splits, .eval_splits, .label_names, .task
    load_processor(backbone_cfg)                -> the preprocessor encode takes: a tokenizer, an image processor
    load_model(backbone_cfg, label_names)       -> a transformers model with the task's head
    encode(data, processor, cfg)                -> {split: Encoded}: len(), .lengths, .batch(idx)
    loss(net, batch, encoded)                   -> the training loss of one batch
    evaluate(accelerator, net, data, encoded, batch_size) -> {"metrics": {split: {..}}, "score": float}

A module may also declare `UNSUPPORTED = {method: why}`: methods that have nothing to act on in its
models, refused before anything loads (`check_method`); its `Encoded` train split may bring its own
`train_batches(batch_size, seed, epoch, group_by_length)` (multi-task: one task per batch);
`SPARSE_GRADIENTS = True` says some parameters get no gradient in a step (one task's head); and
`skip_unread_positions(model, method)` lets training and evaluation compute only what the loss
reads (classification: the last layer on the first position).

A dataset's YAML names its task type (`task: causal_lm`); classification (and regression) is the default.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from peftkit.errors import UserError

KINDS = ("classification", "causal_lm", "image_classification", "multitask")
DEFAULT = "classification"


def get(kind: str | None) -> ModuleType:
    kind = kind or DEFAULT
    if kind not in KINDS:
        raise UserError(f"dataset.task={kind}: unknown task type; choose one of: {', '.join(KINDS)}")
    return importlib.import_module(f"{__name__}.{kind}")


def of(dataset_cfg) -> ModuleType:
    """The task type a dataset config names."""
    return get(dataset_cfg.get("task"))


def check_method(kind: str | None, method: str | None) -> None:
    """One line, before anything loads, for a method the task type's models give nothing to act on."""
    why = getattr(get(kind), "UNSUPPORTED", {}).get(method)
    if why:
        raise UserError(f"method={method} does not fit dataset.task={kind}: {why}; choose another method, e.g. method=lora")
