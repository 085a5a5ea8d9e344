"""Sequence classification and regression (GLUE, your labelled files): a fresh head on the
backbone, cross-entropy (or MSE for one score), GLUE metrics on the dev split."""

from __future__ import annotations

from omegaconf import DictConfig

from peftkit import backbone, data
from peftkit.data.batching import Encoded
from peftkit.evaluation.scoring import score

NAME = "classification"


def load_data(dataset_cfg: DictConfig, splits: tuple[str, ...] = ("train", "validation")) -> data.TaskData:
    return data.load(dataset_cfg, splits)


def load_processor(backbone_cfg: DictConfig):
    return backbone.load_tokenizer(backbone_cfg)


def load_model(backbone_cfg: DictConfig, label_names: list[str] | None):
    """`*ForSequenceClassification` with a head for the labels (one output for regression)."""
    if label_names is None:
        return backbone.load_model(backbone_cfg, 1, "regression")
    return backbone.load_model(backbone_cfg, len(label_names), "single_label_classification", label_names)


def loss(net, batch, encoded: Encoded):
    """The model's own loss (cross-entropy, or MSE for regression) for its head."""
    return net(**batch).loss


def encode(task: data.TaskData, tokenizer, cfg: DictConfig) -> dict[str, Encoded]:
    regression = task.label_names is None
    return {s: Encoded(split, tokenizer, cfg.backbone.max_length, float_labels=regression) for s, split in task.splits.items()}


def evaluate(accelerator, net, task: data.TaskData, encoded: dict[str, Encoded], batch_size: int) -> dict:
    return score(accelerator, net, task, encoded, batch_size)
