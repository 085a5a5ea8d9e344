"""Any CSV/TSV/JSON/JSONL/Parquet file, with a column mapping; a dev split given or carved out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from peftkit.data import Split, TaskData, labels_to_ids
from peftkit.errors import UserError
from peftkit.evaluation.metrics import METRICS

READERS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}


def read_table(path_str: str, key: str = "dataset.train_file"):
    import pandas as pd

    path = Path(path_str).expanduser()
    if not path.is_file():
        raise UserError(f"data file {path} not found; set {key}=PATH to an existing file")
    suffixes = [s for s in path.suffixes if s in READERS]
    if not suffixes:
        raise UserError(f"{path}: unknown file type; use one of {', '.join(READERS)} (optionally compressed)")
    kind = READERS[suffixes[-1]]
    try:
        if kind in ("csv", "tsv"):
            return pd.read_csv(path, sep="\t" if kind == "tsv" else ",", dtype=str, keep_default_na=False)
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=kind == "jsonl", dtype=False)
    except (ValueError, OSError) as e:  # pandas' ParserError is a ValueError; pyarrow's errors too
        raise UserError(f"{path}: cannot read as {kind}: {' '.join(str(e).split())}") from None


def _split(df, cfg: DictConfig, label_names, where: str) -> Split:
    cols = [*cfg.text_fields, cfg.label_field]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UserError(f"{where}: missing column(s) {missing}; columns are {list(df.columns)} (set dataset.text_fields / dataset.label_field)")
    if len(cfg.text_fields) not in (1, 2):
        raise UserError("dataset.text_fields takes one or two columns")
    texts = [df[c].astype(str).tolist() for c in cfg.text_fields]
    labels = labels_to_ids(df[cfg.label_field].tolist(), label_names, where)
    ids = df[cfg.id_field].tolist() if cfg.get("id_field") else df.index.tolist()  # row numbers in the file
    return Split(texts[0], texts[1] if len(texts) > 1 else None, labels, ids)


def load(cfg: DictConfig, splits: tuple[str, ...]) -> TaskData:
    if not cfg.get("train_file"):
        raise UserError("dataset=local needs dataset.train_file=PATH (csv, tsv, json, jsonl or parquet)")
    train_df = read_table(cfg.train_file)
    if cfg.regression:
        label_names = None
    elif cfg.get("label_names"):
        label_names = [str(n) for n in cfg.label_names]
    else:
        if cfg.label_field not in train_df.columns:
            raise UserError(f"{cfg.train_file}: missing label column '{cfg.label_field}'; columns are {list(train_df.columns)} (set dataset.label_field)")
        label_names = sorted({str(v) for v in train_df[cfg.label_field]})
    if cfg.get("dev_file"):
        dev_df = read_table(cfg.dev_file, "dataset.dev_file")
    else:  # carve a dev split out of train with a fixed seed
        order = np.random.default_rng(cfg.split_seed).permutation(len(train_df))
        n_dev = max(1, int(round(len(train_df) * cfg.dev_fraction)))
        dev_df, train_df = train_df.iloc[np.sort(order[:n_dev])], train_df.iloc[np.sort(order[n_dev:])]
    out = {"train": _split(train_df, cfg, label_names, str(cfg.train_file)),
           "validation": _split(dev_df, cfg, label_names, str(cfg.get("dev_file") or cfg.train_file))}
    metrics = ("pearson", "spearman") if label_names is None else tuple(cfg.metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {unknown} in dataset.metrics; choose from: accuracy, f1, matthews")
    return TaskData(cfg.name, Path(cfg.train_file).stem, label_names, metrics, out)
