"""GLUE metrics in NumPy: accuracy, binary F1 (positive class 1), Matthews
correlation; macro F1 for the user's own tasks. ``predictions`` may be class
ids ``[n]`` or logits ``[n, C]``."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _as_classes(predictions) -> np.ndarray:
    p = np.asarray(predictions)
    if p.ndim == 2:
        return p.argmax(axis=-1)
    if p.ndim != 1:
        raise ValueError(f"predictions must be [n] class ids or [n, C] logits, got shape {p.shape}")
    return p.astype(np.int64)


def _check(pred: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"{pred.shape[0]} predictions for {y.shape[0]} labels")
    if y.size == 0:
        raise ValueError("no examples to score")
    return pred, y


def accuracy(predictions, labels) -> float:
    p, y = _check(_as_classes(predictions), labels)
    return float(np.mean(p == y))


def f1(predictions, labels) -> float:
    """F1 of the positive class (label 1), as GLUE scores MRPC and QQP; 0 when
    there are no true positives."""
    p, y = _check(_as_classes(predictions), labels)
    tp = float(np.sum((p == 1) & (y == 1)))
    fp = float(np.sum((p == 1) & (y != 1)))
    fn = float(np.sum((p != 1) & (y == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def macro_f1(predictions, labels) -> float:
    """The unweighted mean of each class's F1 (one class against the rest), over
    the classes that occur in the labels or the predictions, as scikit-learn's
    ``f1_score(average="macro")``; a class never predicted correctly scores 0."""
    p, y = _check(_as_classes(predictions), labels)
    scores = []
    for c in np.union1d(p, y):
        tp = float(np.sum((p == c) & (y == c)))
        wrong = float(np.sum((p == c) != (y == c)))  # false positives + false negatives
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + wrong))
    return float(np.mean(scores))


def matthews_correlation(predictions, labels) -> float:
    """Matthews correlation (binary), as GLUE scores CoLA; 0 when undefined
    (a constant prediction or label vector), as scikit-learn does."""
    p, y = _check(_as_classes(predictions), labels)
    tp = float(np.sum((p == 1) & (y == 1)))
    tn = float(np.sum((p != 1) & (y != 1)))
    fp = float(np.sum((p == 1) & (y != 1)))
    fn = float(np.sum((p != 1) & (y == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "matthews_correlation": matthews_correlation,
}


def compute(metric_names: Iterable[str], predictions, labels) -> dict[str, float]:
    """The named metrics. ``combined_score`` is the mean of ``f1`` and
    ``accuracy`` (GLUE's task score for MRPC and QQP); it needs both."""
    names = tuple(metric_names)
    out = {m: METRICS[m](predictions, labels) for m in names if m in METRICS}
    if "combined_score" in names:
        out["combined_score"] = (out["f1"] + out["accuracy"]) / 2
    return out
