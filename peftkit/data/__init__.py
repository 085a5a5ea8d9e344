"""Task data: every source (GLUE, local files, the quickstart corpus) becomes the same `TaskData`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from peftkit.errors import UserError


@dataclass
class Split:
    """One split as parallel lists. `text_b` is None for single-sentence tasks, `labels` for test."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list | None
    ids: list

    def __len__(self) -> int:
        return len(self.text_a)

    def head(self, n: int | None) -> Split:
        if n is None or n >= len(self):
            return self
        cut = lambda xs: None if xs is None else xs[:n]  # noqa: E731
        return Split(self.text_a[:n], cut(self.text_b), cut(self.labels), self.ids[:n])


@dataclass
class TaskData:
    name: str  # what the user typed: glue/rte, quickstart, local
    task: str  # the GLUE task key, or the dataset's name
    label_names: list[str] | None  # None: regression
    metrics: tuple[str, ...]
    splits: dict[str, Split]  # train, validation[_matched|_mismatched], test[_matched|_mismatched]

    @property
    def eval_splits(self) -> list[str]:
        return [s for s in self.splits if s.startswith("validation")]

    @property
    def held_out_splits(self) -> list[str]:
        """Labelled test splits (`dataset.test_file`): scored beside the eval splits, never in the score that picks a step."""
        return [s for s, split in self.splits.items() if s.startswith("test") and split.labels is not None]

    @property
    def problem_type(self) -> str:
        return "regression" if self.label_names is None else "single_label_classification"

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


def load(cfg: DictConfig, splits: tuple[str, ...] = ("train", "validation")) -> TaskData:
    """Load the splits a run needs (`test` only for submissions)."""
    from peftkit.data import glue, local, quickstart

    kind = cfg.name.split("/")[0]
    loaders = {"glue": glue.load, "local": local.load, "quickstart": quickstart.load}
    if kind not in loaders:
        raise UserError(f"unknown dataset kind '{kind}'; choose one of: {', '.join(loaders)}")
    data = loaders[kind](cfg, splits)
    if "train" in data.splits:
        data.splits["train"] = data.splits["train"].head(cfg.get("max_train_samples"))
    for s in data.eval_splits:
        data.splits[s] = data.splits[s].head(cfg.get("max_eval_samples"))
    return data


def label_key(v) -> str:
    """A label as text: 1.0 (an integer column with gaps, read as floats) is '1', like 1."""
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip()


def labels_to_ids(values: list, label_names: list[str] | None, where: str, rows: list | None = None) -> list:
    """Map raw labels (names or integers as text) to class ids, or to floats for regression.

    `rows` names each value's row in messages (default: 1, 2, ...)."""
    rows = range(1, len(values) + 1) if rows is None else rows
    out = []
    if label_names is None:
        for row, v in zip(rows, values):
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise UserError(f"{where}: row {row}: regression labels must be numbers, got {v!r}; fix or remove that row") from None
            if not math.isfinite(x):
                raise UserError(f"{where}: row {row}: regression label {v!r} is not a finite number; fix or remove that row")
            out.append(x)
        return out
    index = {n: i for i, n in enumerate(label_names)}
    for row, v in zip(rows, values):
        key = label_key(v)
        if key in index:
            out.append(index[key])
        elif key.lstrip("-").isdigit() and 0 <= int(key) < len(label_names):
            out.append(int(key))
        else:
            raise UserError(f"{where}: row {row}: label {key!r} is not one of {label_names}")
    return out
