"""Any CSV/TSV/JSON/JSONL/Parquet file, with a column mapping (names, or indexes for a CSV/TSV without a
header row); a dev split given or carved out; a labelled test file held out from choosing the step."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from peftkit.data import Split, TaskData, label_key, labels_to_ids
from peftkit.errors import UserError
from peftkit.evaluation.metrics import METRICS

READERS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}


def file_kind(path_str: str) -> str | None:
    """csv, tsv, json, jsonl or parquet, from the file's name (`reviews.tsv.gz`: tsv); None if none of them."""
    suffixes = [s for s in Path(path_str).suffixes if s in READERS]
    return READERS[suffixes[-1]] if suffixes else None


def read_table(path_str: str, key: str = "dataset.train_file", header: bool = True):
    """The file as a DataFrame with at least one row; CSV/TSV cells stay text ('' when empty).
    `header=False`: a CSV/TSV whose first row is data; its columns are 0, 1, ..."""
    import pandas as pd

    path = Path(path_str).expanduser()
    if path.is_dir():
        raise UserError(f"{key}={path_str} is a folder; set {key}=PATH to a data file in it")
    if not path.is_file():
        raise UserError(f"data file {path} not found; set {key}=PATH to an existing file")
    kind = file_kind(path_str)
    if kind is None:
        raise UserError(f"{path}: unknown file type; use one of {', '.join(READERS)} (optionally compressed)")
    if not header and kind not in ("csv", "tsv"):
        raise UserError(f"{path}: dataset.header=false is for CSV/TSV files without a header row, and a {kind} file names its "
                        "columns; set dataset.header=true and name the columns in dataset.text_fields / dataset.label_field")
    df = None
    try:
        if path.stat().st_size == 0:
            pass
        elif kind in ("csv", "tsv"):
            sep = "\t" if kind == "tsv" else ","
            # the first row as written: pandas reads a second 'text' column as 'text.1' without a word
            first = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].tolist()
            dup = next((c for i, c in enumerate(first) if c and c in first[:i]), None) if header else None
            if dup is not None:
                raise UserError(f"{path}: column '{dup}' appears twice in the header; give each column its own name")
            df = _read_rows(path, sep, len(first), header)
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


def _read_rows(path: Path, sep: str, n_first: int, header: bool = True):
    """The rows (under the header, if `header`); a row with more fields than the first is one line naming
    it (left alone, pandas would quietly read the first columns as the row index, every value shifted)."""
    import re
    import warnings

    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, index_col=False, header=0 if header else None)
        except pd.errors.ParserWarning:
            pass
        except pd.errors.ParserError as e:  # without a header, a long row is an error, not a warning
            if header or not re.search(r"Expected \d+ fields", str(e)):
                raise
    try:  # find the first long row: without the header, pandas names it
        pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False)
        where = "a row"
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        where = f"line {m[2]} has {m[3]} fields" if m else f"a row has more fields than the {'header' if header else 'first row'}"
    name = "tab" if sep == "\t" else f"'{sep}'"
    raise UserError(f"{path}: {where}, the {'header' if header else 'first row'} {n_first}; "
                    f"quote a text that holds a {name} (\"a{sep} b\") or fix that line")


def _missing(v) -> bool:
    import pandas as pd

    if isinstance(v, str):
        return not v.strip()
    return not isinstance(v, (list, tuple, dict, np.ndarray)) and bool(pd.isna(v))


def _columns(cfg: DictConfig) -> dict[str, list]:
    """The columns each key asks for: names, or indexes (0, 1, ...) with dataset.header=false."""
    has_id = cfg.get("id_field") is not None
    return {"text_fields": list(cfg.text_fields), "label_field": [cfg.label_field], **({"id_field": [cfg.id_field]} if has_id else {})}


def _clean(df, cfg: DictConfig, where: str, headed_csv: bool = False):
    """Check the columns, refuse multi-label rows, drop rows with an empty text or label (with a warning).
    `headed_csv`: the column names are a CSV/TSV's first row, which may be data (a file without a header)."""
    asked = _columns(cfg)
    if not cfg.get("header", True):
        n = len(df.columns)
        for key, cols in asked.items():
            for c in cols:
                if isinstance(c, int) and c >= n:
                    raise UserError(f"{where}: dataset.{key} asks for column {c}, but the file has {n} column(s), numbered from 0; "
                                    f"set dataset.{key} to an index from 0 to {n - 1}")
    missing = [c for cols in asked.values() for c in cols if c not in df.columns]
    if missing:
        why = _header_is_data(df, cfg) if headed_csv else None
        if why:
            raise UserError(f"{where}: missing column(s) {missing}; its first row looks like data, not column names ({why}): "
                            f"read it with {_headerless_settings(df, len(cfg.text_fields))}")
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


# what spreadsheets, R and pandas write for a missing value: as a class name found in the data, almost always one
MISSING_MARKS = {"nan", "none", "null", "na", "n/a", "#n/a", "<na>"}


def warn_missing_marks(labels, label_names: list[str], column: str, where: str) -> None:
    """Warn when an inferred class is named like a missing value ("NaN", "NA", "null"): trained as a
    class of its own, it would pass silently. Declared classes (dataset.label_names) are not questioned."""
    for name in label_names:
        if name.lower() in MISSING_MARKS:
            rows = labels.index[labels.map(label_key) == name]
            print(f"peftkit: warning: {where}: {len(rows)} row(s) have the label {name!r} in column '{column}' (the first is row "
                  f"{rows[0] + 1}), which reads like a missing value; it is trained as a class of its own. Fill in or remove "
                  f"those rows, or declare the classes with dataset.label_names=[...,{name!r}] if it is a real one", file=sys.stderr)


def _header_is_data(df, cfg: DictConfig) -> str | None:
    """Why a CSV/TSV's header row reads as a data row (a number, a sentence, a label, a value its column
    holds below), or None."""
    import math

    labels = {str(n) for n in cfg.get("label_names") or []}
    for i, cell in enumerate(map(str, df.columns)):
        text = cell.strip()
        if not text or text.startswith("Unnamed: "):  # pandas' name for an empty header cell
            continue
        try:
            if math.isfinite(float(text)):
                return f"{text!r} is a number"
        except ValueError:
            pass
        if len(text.split()) >= 6 or len(text) > 60:
            return f"{text[:40]!r}{'...' if len(text) > 40 else ''} is a sentence"
        if text in labels:
            return f"{text!r} is one of dataset.label_names"
        if df.iloc[:, i].astype(str).str.strip().eq(text).any():
            return f"{text!r} is also a value in its column"
    return None


def _headerless_settings(df, n_text: int) -> str:
    """The settings that read a headerless CSV/TSV: its longest-text column(s) as text, the column with
    the fewest distinct values among the rest as the label (from the first 1,000 rows)."""
    n = len(df.columns)
    if n < n_text + 1:
        return "dataset.header=false and the columns by index (0, 1, ...) in dataset.text_fields / dataset.label_field"
    sample = df.head(1000).astype(str)
    cols = [[str(h), *sample.iloc[:, i]] for i, h in enumerate(df.columns)]  # the header row is data too
    length = [float(np.mean([len(v) for v in c])) for c in cols]
    text = sorted(sorted(range(n), key=lambda i: -length[i])[:n_text])
    label = min((i for i in range(n) if i not in text), key=lambda i: len(set(cols[i])))
    return f"dataset.header=false dataset.text_fields=[{','.join(map(str, text))}] dataset.label_field={label}"


def _split(df, cfg: DictConfig, label_names, where: str) -> Split:
    texts = [df[c].astype(str).tolist() for c in cfg.text_fields]
    labels = labels_to_ids(df[cfg.label_field].tolist(), label_names, where, rows=[i + 1 for i in df.index])
    ids = df[cfg.id_field].tolist() if cfg.get("id_field") is not None else df.index.tolist()  # row numbers in the file
    return Split(texts[0], texts[1] if len(texts) > 1 else None, labels, ids)


# a file named like a split says nothing of its task: sst2/train.tsv is task sst2
SPLIT_STEM = re.compile(r"(train|training|dev|val|valid|validation|test|data|dataset|all|full)([-_]?\d[\w-]*)?", re.IGNORECASE)
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".tar")


def task_name(cfg: DictConfig) -> str:
    """`dataset.task_name`, else the train file's name without its extensions (reviews.csv: reviews), or
    for a file named like a split (train.tsv, dev.csv, data.jsonl) its folder's name (sst2/train.tsv:
    sst2; a file in / keeps its own). Never the current folder's part: eval elsewhere names it the same."""
    if cfg.get("task_name"):
        return str(cfg.task_name)
    path = Path(cfg.train_file).expanduser()
    stem = path.name
    for suffix in reversed(path.suffixes):
        if suffix not in READERS and suffix not in COMPRESSED:
            break
        stem = stem[: -len(suffix)]
    folder = path.resolve().parent
    if SPLIT_STEM.fullmatch(stem) and folder.name:
        return folder.name
    return stem


def load(cfg: DictConfig, splits: tuple[str, ...]) -> TaskData:
    if not cfg.get("train_file"):
        raise UserError("dataset=local needs dataset.train_file=PATH (csv, tsv, json, jsonl or parquet)")
    for key in ("text_fields", "label_names"):
        if isinstance(cfg.get(key), str):
            raise UserError(f"dataset.{key} is the string '{cfg[key]}', not a list; write dataset.{key}=[{cfg[key]}]")
    if len(cfg.text_fields) not in (1, 2):
        raise UserError("dataset.text_fields takes one or two columns")
    header = cfg.get("header", True)
    for key in ("train_file", "dev_file"):  # before reading anything: a test split shares no file with those
        if cfg.get("test_file") and cfg.get(key) and _same_file(cfg.test_file, cfg[key]):
            raise UserError(f"dataset.test_file={cfg.test_file} is also dataset.{key}: a test split must be rows the run neither "
                            "trains on nor chooses its step with; give a separate labelled file, or set dataset.test_file=null")

    def clean(path: str, key: str):
        return _clean(read_table(path, key, header), cfg, str(path), header and file_kind(path) in ("csv", "tsv"))

    where = str(cfg.train_file)
    train_df = clean(cfg.train_file, "dataset.train_file")
    if cfg.regression:
        label_names = None
    elif cfg.get("label_names"):
        label_names = [str(n) for n in cfg.label_names]
    else:
        label_names = sorted({label_key(v) for v in train_df[cfg.label_field]})
        warn_missing_marks(train_df[cfg.label_field], label_names, cfg.label_field, where)
    if cfg.get("dev_file"):
        dev_df = clean(cfg.dev_file, "dataset.dev_file")
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
    if cfg.get("test_file"):  # held out: scored beside validation with the same model, never used to choose it
        out["test"] = _split(clean(cfg.test_file, "dataset.test_file"), cfg, label_names, str(cfg.test_file))
    metrics = ("pearson", "spearman") if label_names is None else tuple(cfg.metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {unknown} in dataset.metrics; choose from: accuracy, f1, matthews")
    return TaskData(cfg.name, task_name(cfg), label_names, metrics, out)


def _same_file(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
