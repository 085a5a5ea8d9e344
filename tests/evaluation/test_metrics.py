"""GLUE metrics in points, each against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peftkit.evaluation import metrics


def counts(p, y):
    p, y = np.asarray(p), np.asarray(y)
    tp = int(((p == 1) & (y == 1)).sum())
    tn = int(((p == 0) & (y == 0)).sum())
    fp = int(((p == 1) & (y == 0)).sum())
    fn = int(((p == 0) & (y == 1)).sum())
    return tp, tn, fp, fn


def matthews_by_formula(p, y) -> float:
    tp, tn, fp, fn = counts(p, y)
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if den == 0 else (tp * tn - fp * fn) / den


def ranks(x) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), without scipy."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def random_binary(n, seed, p_right=0.8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < p_right, y, 1 - y)
    return p, y


# ---- hand-computed small cases ------------------------------------------------------------------------

def test_accuracy_by_hand():
    assert metrics.compute(("accuracy",), [0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 75.0}
    assert metrics.compute(("accuracy",), [2, 1, 0], [2, 1, 0]) == {"accuracy": 100.0}


def test_f1_by_hand():
    # tp=2, fp=1, fn=1 -> precision 2/3, recall 2/3, F1 2/3
    out = metrics.compute(("f1",), [1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert out["f1"] == pytest.approx(200 / 3)


def test_f1_is_of_the_positive_class():
    # all negatives right, the one positive missed: F1 of class 1 is 0 (accuracy would be 80)
    out = metrics.compute(("f1", "accuracy"), [0, 0, 0, 0, 0], [0, 0, 0, 0, 1])
    assert out == {"f1": 0.0, "accuracy": 80.0}


def test_matthews_by_hand():
    # tp=2 tn=1 fp=1 fn=0: (2*1 - 1*0) / sqrt(3*2*2*1) = 2/sqrt(12)
    out = metrics.compute(("matthews",), [1, 1, 1, 0], [1, 1, 0, 0])
    assert out["matthews"] == pytest.approx(100 * 2 / math.sqrt(12))
    assert metrics.compute(("matthews",), [1, 0, 1, 0], [0, 1, 0, 1])["matthews"] == pytest.approx(-100.0)


def test_pearson_and_spearman_by_hand():
    # perfectly monotone but not linear: Spearman 100, Pearson below
    p, y = [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0]
    out = metrics.compute(("pearson", "spearman"), p, y)
    assert out["spearman"] == pytest.approx(100.0)
    assert out["pearson"] == pytest.approx(100 * 0.98437, abs=1e-3)


def test_constant_predictions_score_zero_not_nan():
    y = [0.0, 1.5, 3.0, 4.5]
    out = metrics.compute(("pearson", "spearman"), [2.0] * 4, y)
    assert out == {"pearson": 0.0, "spearman": 0.0}
    assert metrics.compute(("matthews",), [1, 1, 1, 1], [1, 0, 1, 0]) == {"matthews": 0.0}


# ---- against direct formulas on random data -------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_formulas(seed):
    p, y = random_binary(257, seed, p_right=0.55 + 0.1 * seed)
    tp, tn, fp, fn = counts(p, y)
    out = metrics.compute(("accuracy", "f1", "matthews"), p, y)
    assert out["accuracy"] == pytest.approx(100 * (tp + tn) / len(y))
    assert out["f1"] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))
    assert out["matthews"] == pytest.approx(100 * matthews_by_formula(p, y))


def test_multiclass_accuracy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    p = np.where(rng.random(500) < 0.6, y, rng.integers(0, 3, 500))
    assert metrics.compute(("accuracy",), p, y)["accuracy"] == pytest.approx(100 * np.mean(p == y))


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_numpy(seed):
    rng = np.random.default_rng(seed)
    y = np.round(rng.uniform(0, 5, 300) * 5) / 5  # STS-B-like scores with ties
    p = y + rng.normal(0, 0.5 + seed, 300)
    out = metrics.compute(("pearson", "spearman"), p, y)
    assert out["pearson"] == pytest.approx(100 * np.corrcoef(p, y)[0, 1], abs=1e-9)
    assert out["spearman"] == pytest.approx(100 * np.corrcoef(ranks(p), ranks(y))[0, 1], abs=1e-9)


def test_compute_accepts_lists_and_arrays_and_returns_floats():
    p, y = random_binary(50, 9)
    a = metrics.compute(("accuracy", "f1", "matthews"), p.tolist(), y.tolist())
    b = metrics.compute(("accuracy", "f1", "matthews"), p, y)
    assert a == b
    assert list(a) == ["accuracy", "f1", "matthews"]
    assert all(type(v) is float for v in a.values())


# ---- task score ----------------------------------------------------------------------------------------

def test_task_score_is_the_mean_over_metrics():
    assert metrics.task_score({"validation": {"f1": 90.0, "accuracy": 85.0}}) == pytest.approx(87.5)
    assert metrics.task_score({"validation": {"matthews": 55.5}}) == pytest.approx(55.5)


def test_task_score_is_the_mean_over_splits():
    per_split = {"validation_matched": {"accuracy": 80.0}, "validation_mismatched": {"accuracy": 83.0}}
    assert metrics.task_score(per_split) == pytest.approx(81.5)
    two_by_two = {"a": {"pearson": 88.0, "spearman": 86.0}, "b": {"pearson": 70.0, "spearman": 76.0}}
    assert metrics.task_score(two_by_two) == pytest.approx(80.0)


def test_task_score_of_computed_metrics():
    p, y = random_binary(300, 4)
    per_split = {"validation": metrics.compute(("f1", "accuracy"), p, y)}
    tp, tn, fp, fn = counts(p, y)
    expected = (100 * 2 * tp / (2 * tp + fp + fn) + 100 * (tp + tn) / len(y)) / 2
    assert metrics.task_score(per_split) == pytest.approx(expected)
