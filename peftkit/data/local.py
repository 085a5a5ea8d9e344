"""Any CSV/TSV/JSON/JSONL/Parquet file, with a column mapping; a dev split given or carved out."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from peftkit.data import Split, TaskData, label_key, labels_to_ids
from peftkit.errors import UserError
from peftkit.evaluation.metrics import METRICS

READERS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}


def read_table(path_str: str, key: str = "dataset.train_file"):
    """The file as a DataFrame with at least one row; CSV/TSV cells stay text ('' when empty)."""
    import pandas as pd

    path = Path(path_str).expanduser()
    if not path.is_file():
        raise UserError(f"data file {path} not found; set {key}=PATH to an existing file")
    suffixes = [s for s in path.suffixes if s in READERS]
    if not suffixes:
        raise UserError(f"{path}: unknown file type; use one of {', '.join(READERS)} (optionally compressed)")
    kind = READERS[suffixes[-1]]
    df = None
    try:
        if path.stat().st_size == 0:
            pass
        elif kind in ("csv", "tsv"):
            sep = "\t" if kind == "tsv" else ","
            # the header as written: pandas reads a second 'text' column as 'text.1' without a word
            header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].tolist()
            dup = next((c for i, c in enumerate(header) if c and c in header[:i]), None)
            if dup is not None:
                raise UserError(f"{path}: column '{dup}' appears twice in the header; give each column its own name")
            df = _read_rows(path, sep, len(header))
        elif kind == "parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_json(path, lines=kind == "jsonl", dtype=False)
    except pd.errors.EmptyDataError:  # only blank lines
        pass
    except (ValueError, OSError) as e:  # pandas' ParserError is a ValueError; pyarrow's errors too
        raise UserError(f"{path}: cannot read as {kind}: {' '.join(str(e).split())}") from None
    if df is None or len(df) == 0:
        what = f"has columns {list(df.columns)} but no rows" if df is not None and len(df.columns) else "is empty"
        raise UserError(f"{path} {what}; add data rows, or set {key}=PATH to the file that has them")
    if not isinstance(df.index, pd.RangeIndex):  # a JSON object's keys, a parquet file's saved index: rows are counted 0, 1, ...
        df = df.reset_index(drop=True)
    return df


def _read_rows(path: Path, sep: str, n_header: int):
    """The rows under the header; a row with more fields than the header is one line naming it (left
    alone, pandas would quietly read the first columns as the row index, every value shifted)."""
    import re
    import warnings

    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, index_col=False)
        except pd.errors.ParserWarning:
            pass
    try:  # find the first long row: without the header, pandas names it
        pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False)
        where = "a row"
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        where = f"line {m[2]} has {m[3]} fields" if m else "a row has more fields than the header"
    name = "tab" if sep == "\t" else f"'{sep}'"
    raise UserError(f"{path}: {where}, the header {n_header}; quote a text that holds a {name} (\"a{sep} b\") or fix that line")


def _missing(v) -> bool:
    import pandas as pd

    if isinstance(v, str):
        return not v.strip()
    return not isinstance(v, (list, tuple, dict, np.ndarray)) and bool(pd.isna(v))


def _clean(df, cfg: DictConfig, where: str):
    """Check the columns, refuse multi-label rows, drop rows with an empty text or label (with a warning)."""
    cols = [*cfg.text_fields, cfg.label_field, *([cfg.id_field] if cfg.get("id_field") else [])]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UserError(f"{where}: missing column(s) {missing}; columns are {list(df.columns)} "
                        f"(set dataset.text_fields / dataset.label_field / dataset.id_field)")
    labels = df[cfg.label_field]
    for i, v in labels.items():
        if isinstance(v, (list, tuple, dict, np.ndarray)):
            v = v.tolist() if isinstance(v, np.ndarray) else v
            raise UserError(f"{where}: row {i + 1}: label {v!r} in column '{cfg.label_field}' is a {type(v).__name__}; "
                            "labels must be one class name or number per row (multi-label is not supported)")
    no_text = np.logical_or.reduce([df[c].map(_missing).to_numpy(bool) for c in cfg.text_fields])
    no_label = labels.map(_missing).to_numpy(bool)
    drop = no_text | no_label
    counts = {f"text in {list(cfg.text_fields)}": no_text.sum(), f"label in '{cfg.label_field}'": no_label.sum()}
    why = ", ".join(f"{n} with an empty {what}" for what, n in counts.items() if n)
    if drop.all():
        raise UserError(f"{where}: no usable rows: all {len(df)} have an empty text or label ({why}); "
                        "fill them in, or set dataset.text_fields / dataset.label_field to the right columns")
    if drop.any():
        print(f"peftkit: warning: {where}: dropped {drop.sum()} of {len(df)} rows ({why}; the first is row {df.index[drop][0] + 1})",
              file=sys.stderr)
    return df[~drop]


def _split(df, cfg: DictConfig, label_names, where: str) -> Split:
    texts = [df[c].astype(str).tolist() for c in cfg.text_fields]
    labels = labels_to_ids(df[cfg.label_field].tolist(), label_names, where, rows=[i + 1 for i in df.index])
    ids = df[cfg.id_field].tolist() if cfg.get("id_field") else df.index.tolist()  # row numbers in the file
    return Split(texts[0], texts[1] if len(texts) > 1 else None, labels, ids)


def load(cfg: DictConfig, splits: tuple[str, ...]) -> TaskData:
    if not cfg.get("train_file"):
        raise UserError("dataset=local needs dataset.train_file=PATH (csv, tsv, json, jsonl or parquet)")
    for key in ("text_fields", "label_names"):
        if isinstance(cfg.get(key), str):
            raise UserError(f"dataset.{key} is the string '{cfg[key]}', not a list; write dataset.{key}=[{cfg[key]}]")
    if len(cfg.text_fields) not in (1, 2):
        raise UserError("dataset.text_fields takes one or two columns")
    where = str(cfg.train_file)
    train_df = _clean(read_table(cfg.train_file), cfg, where)
    if cfg.regression:
        label_names = None
    elif cfg.get("label_names"):
        label_names = [str(n) for n in cfg.label_names]
    else:
        label_names = sorted({label_key(v) for v in train_df[cfg.label_field]})
    if cfg.get("dev_file"):
        dev_df = _clean(read_table(cfg.dev_file, "dataset.dev_file"), cfg, str(cfg.dev_file))
    else:  # carve a dev split out of train with a fixed seed
        n, fraction = len(train_df), cfg.dev_fraction
        n_dev = min(n, max(1 if fraction > 0 else 0, int(round(n * fraction))))
        if not 0 < n_dev < n:
            raise UserError(f"{where} has {n} usable row(s): dataset.dev_fraction={fraction} leaves {n_dev} for dev and {n - n_dev} for train, "
                            "and both need rows; set dataset.dev_fraction between 0 and 1, add rows, or give a dev set with dataset.dev_file=PATH")
        order = np.random.default_rng(cfg.split_seed).permutation(n)
        dev_df, train_df = train_df.iloc[np.sort(order[:n_dev])], train_df.iloc[np.sort(order[n_dev:])]
    train = _split(train_df, cfg, label_names, where)
    if label_names is not None:
        present = sorted({label_names[y] for y in train.labels})
        if len(label_names if cfg.get("label_names") else present) < 2:
            raise UserError(f"{where}: the train split has one class only, {present[0]!r} (column '{cfg.label_field}'), and classification needs "
                            "at least two; set dataset.regression=true if the labels are scores, or declare the classes with dataset.label_names=[...]")
    out = {"train": train, "validation": _split(dev_df, cfg, label_names, str(cfg.get("dev_file") or cfg.train_file))}
    metrics = ("pearson", "spearman") if label_names is None else tuple(cfg.metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {unknown} in dataset.metrics; choose from: accuracy, f1, matthews")
    return TaskData(cfg.name, Path(cfg.train_file).stem, label_names, metrics, out)
