"""GLUE: the nine tasks, from a local copy in the original TSV layout or from the Hub (nyu-mll/glue)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from peftkit.data import Split, TaskData, labels_to_ids
from peftkit.errors import UserError

GLUE_DIR_ENV = "PEFTKIT_GLUE_DIR"


@dataclass(frozen=True)
class GlueTask:
    folder: str  # directory name in the GLUE download
    text: tuple[str, ...]  # TSV column names (or indices for header-less CoLA)
    label: str | int
    hub_text: tuple[str, ...]  # column names in nyu-mll/glue
    label_names: tuple[str, ...] | None  # in the Hub's order; None for regression
    metrics: tuple[str, ...]
    submission: tuple[str, ...]  # GLUE-server file names, one per test split
    eval_files: tuple[str, ...] = ("dev",)
    header: bool = True


TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", (3,), 1, ("sentence",), ("unacceptable", "acceptable"), ("matthews",), ("CoLA",), header=False),
    "sst2": GlueTask("SST-2", ("sentence",), "label", ("sentence",), ("negative", "positive"), ("accuracy",), ("SST-2",)),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"), ("MRPC",)),
    "stsb": GlueTask("STS-B", ("sentence1", "sentence2"), "score", ("sentence1", "sentence2"), None, ("pearson", "spearman"), ("STS-B",)),
    "qqp": GlueTask("QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), ("QQP",)),
    "mnli": GlueTask("MNLI", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",), ("MNLI-m", "MNLI-mm"), eval_files=("dev_matched", "dev_mismatched")),
    "qnli": GlueTask("QNLI", ("question", "sentence"), "label", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), ("QNLI",)),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), ("RTE",)),
    "wnli": GlueTask("WNLI", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), ("WNLI",)),
}


def split_names(task: GlueTask, kind: str) -> list[str]:
    """validation -> [validation] or [validation_matched, validation_mismatched] for MNLI."""
    if len(task.eval_files) == 1:
        return [kind]
    return [f"{kind}_{f.split('_', 1)[1]}" for f in task.eval_files]


def load(cfg: DictConfig, splits: tuple[str, ...]) -> TaskData:
    key = cfg.name.split("/", 1)[-1]
    if key not in TASKS:
        raise UserError(f"unknown GLUE task '{key}'; choose one of: {', '.join(TASKS)}")
    task = TASKS[key]
    data_dir = cfg.get("data_dir") or os.environ.get(GLUE_DIR_ENV)
    wanted = []
    for s in splits:
        wanted += ["train"] if s == "train" else split_names(task, s)
    reader = _local_split if data_dir else _hub_split
    source = Path(data_dir).expanduser() if data_dir else None
    out = {s: reader(task, key, s, source) for s in wanted}
    names = list(task.label_names) if task.label_names else None
    return TaskData(cfg.name, key, names, task.metrics, out)


def _file_name(task: GlueTask, split: str) -> str:
    if split == "train":
        return "train"
    kind, _, sub = split.partition("_")
    return ("dev" if kind == "validation" else "test") + (f"_{sub}" if sub else "")


def read_tsv(path: Path, header: bool):
    import pandas as pd

    if not path.is_file():
        raise UserError(
            f"GLUE file {path} not found; dataset.data_dir (or {GLUE_DIR_ENV}) must hold the original "
            f"GLUE layout, e.g. <dir>/RTE/train.tsv and <dir>/RTE/dev.tsv"
        )
    return pd.read_csv(
        path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False,
        encoding="utf-8-sig", header=0 if header else None, on_bad_lines="skip",
    )


def _local_split(task: GlueTask, key: str, split: str, root: Path) -> Split:
    path = root / task.folder / f"{_file_name(task, split)}.tsv"
    is_test = split.startswith("test")
    df = read_tsv(path, header=task.header or is_test)
    text_cols = task.text
    if is_test and not task.header:  # CoLA's test.tsv has a header: index, sentence
        text_cols = ("sentence",)
    missing = [c for c in text_cols if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; columns are {list(df.columns)}")
    texts = [df[c].tolist() for c in text_cols]
    labels = None
    if not is_test:
        if task.label not in df.columns:
            raise UserError(f"{path}: missing label column '{task.label}'; columns are {list(df.columns)}")
        names = list(task.label_names) if task.label_names else None
        labels = labels_to_ids(df[task.label].tolist(), names, str(path))
    id_col = next((c for c in ("index", "id") if c in df.columns), None)
    ids = df[id_col].tolist() if id_col else list(range(len(df)))
    return Split(texts[0], texts[1] if len(texts) > 1 else None, labels, ids)


def _hub_split(task: GlueTask, key: str, split: str, root) -> Split:
    import datasets

    from peftkit import hub

    hint = f"set dataset.data_dir=/path/to/glue_data (the original GLUE TSVs) or {GLUE_DIR_ENV}"
    if not (hub.online() or hub.offline_mode()):
        raise UserError(f"glue/{key} loads nyu-mll/glue from the Hugging Face Hub, which is unreachable; {hint}")
    try:
        ds = datasets.load_dataset("nyu-mll/glue", key, split=split)
    except (ConnectionError, FileNotFoundError, OSError) as e:
        raise UserError(f"glue/{key}: cannot load nyu-mll/glue ({type(e).__name__}); {hint}") from None
    texts = [ds[c] for c in task.hub_text]
    labels = None if split.startswith("test") else ds["label"]
    return Split(texts[0], texts[1] if len(texts) > 1 else None, labels, ds["idx"])
