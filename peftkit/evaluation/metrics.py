"""Classification metrics in points (×100), from scikit-learn and SciPy: GLUE's as GLUE defines them,
and macro-F1 (image classification)."""

from __future__ import annotations

import numpy as np


def _pearson(p, y):
    from scipy.stats import pearsonr

    return float(pearsonr(p, y)[0]) if np.std(p) > 0 and np.std(y) > 0 else 0.0  # undefined: no correlation


def _spearman(p, y):
    from scipy.stats import spearmanr

    return float(spearmanr(p, y)[0]) if np.std(p) > 0 and np.std(y) > 0 else 0.0


def _accuracy(p, y):
    return float(np.mean(np.asarray(p) == np.asarray(y)))


def _f1(p, y):
    """Binary F1 of class 1 (GLUE's MRPC, QQP); macro F1 when there are more classes."""
    from sklearn.metrics import f1_score

    binary = set(np.unique(y)) | set(np.unique(p)) <= {0, 1}
    return float(f1_score(y, p, average="binary" if binary else "macro"))


def _macro_f1(p, y):
    """The unweighted mean of each class's F1: every class counts alike, however few its examples."""
    from sklearn.metrics import f1_score

    return float(f1_score(y, p, average="macro"))


def _matthews(p, y):
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(y, p))


METRICS = {"accuracy": _accuracy, "f1": _f1, "macro_f1": _macro_f1, "matthews": _matthews, "pearson": _pearson, "spearman": _spearman}


def compute(names: tuple[str, ...], predictions, labels) -> dict[str, float]:
    return {n: 100.0 * METRICS[n](np.asarray(predictions), np.asarray(labels)) for n in names}


def task_score(per_split: dict[str, dict[str, float]]) -> float:
    """The mean of a task's metrics over its eval splits (MNLI: matched and mismatched)."""
    values = [v for metrics in per_split.values() for v in metrics.values()]
    return float(np.mean(values))
