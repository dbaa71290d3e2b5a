"""Test metrics of many bootstrap resamples at once, as numpy arrays over row counts.

A bootstrap resample of ``n`` test rows is a vector of counts (how often each row was drawn); a
batch of ``b`` resamples is a ``(b, n)`` count matrix. Every metric here is a weighted sum over the
rows, computed for the whole batch in a few array operations, instead of re-running torchmetrics on
each resample's rows (1000 resamples of seven torchmetrics calls took seconds per test run, and
minutes on a million-row test set). The values are those torchmetrics gives on the resampled rows:
``tests/test_bootstrap.py`` checks them against torchmetrics resample by resample.

- :class:`RankedScores`: AUROC (ties count half) and average precision (torchmetrics' step-wise
  ``binary_average_precision``) of one score column, sorted once;
- :func:`rate`, :func:`f1`: safe ratios of weighted counts (0 where the denominator is 0, as
  torchmetrics' ``zero_division=0``);
- :func:`calibration_error`: the ECE of :func:`pipelines.calibration.expected_calibration_error`;
- :func:`macro_f1`: torchmetrics' multi-class macro F1 (classes that never occur, predicted or
  true, are left out of the mean);
- :func:`binary_classification`, :func:`multiclass_classification`: a classifier's AUROC,
  accuracy and F1 of resamples, for the tasks' bootstrap intervals.

Example:
    >>> import numpy as np
    >>> ranked = RankedScores(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]))
    >>> counts = np.array([[1, 1, 1, 1], [2, 0, 1, 1]])
    >>> [round(float(v), 3) for v in ranked.auroc(counts)], [round(float(v), 3) for v in ranked.average_precision(counts)]
    ([0.75, 1.0], [0.833, 1.0])
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

def as_float(counts: np.ndarray) -> np.ndarray:
    """A count matrix as float64: no copy when it already is (``bootstrap_count_intervals`` converts each batch once)."""
    return np.asarray(counts, dtype=np.float64)


def ratio(numerator: np.ndarray, denominator: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """``numerator / denominator``, ``empty`` where the denominator is 0."""
    out = np.full(np.broadcast(numerator, denominator).shape, empty, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def rate(counts: np.ndarray, hit: np.ndarray, among: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """Per resample: the weighted share of rows with ``hit`` among rows with ``among`` (boolean per row)."""
    counts = as_float(counts)
    return ratio(counts @ (hit & among).astype(np.float64), counts @ among.astype(np.float64), empty)


def f1(counts: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per resample: ``2 TP / (2 TP + FP + FN)`` of boolean predictions against boolean labels (0 if empty)."""
    counts = as_float(counts)
    tp = counts @ (predicted & actual).astype(np.float64)
    wrong = counts @ (predicted != actual).astype(np.float64)
    return ratio(2 * tp, 2 * tp + wrong)


def per_class_counts(counts: np.ndarray, predicted: np.ndarray, target: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted true positives, false positives and false negatives per class: three ``(b, classes)`` arrays."""
    counts = as_float(counts)
    predicted_onehot = np.eye(classes)[predicted]
    target_onehot = np.eye(classes)[target]
    tp = counts @ (predicted_onehot * target_onehot)
    return tp, counts @ predicted_onehot - tp, counts @ target_onehot - tp


def macro_f1(counts: np.ndarray, predicted: np.ndarray, target: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per resample: torchmetrics' multi-class macro F1 and the per-class F1 ``(b, classes)``."""
    tp, fp, fn = per_class_counts(counts, predicted, target, classes)
    per_class = ratio(2 * tp, 2 * tp + fp + fn)
    present = (tp + fp + fn) > 0
    return ratio((per_class * present).sum(axis=1), present.sum(axis=1).astype(np.float64)), per_class


def weighted_mean(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per resample: the mean of a per-row value over the drawn rows."""
    counts = as_float(counts)
    return ratio(counts @ np.asarray(values, dtype=np.float64), counts.sum(axis=1), np.nan)


def calibration_error(counts: np.ndarray, confidence: np.ndarray, correct: np.ndarray, bins: int) -> np.ndarray:
    """Per resample: the count-weighted mean gap between confidence and observed frequency per
    equal-width bin (:func:`pipelines.calibration.expected_calibration_error`)."""
    counts = as_float(counts)
    index = np.clip((np.asarray(confidence) * bins).astype(int), 0, bins - 1)
    gap = np.zeros((len(index), bins))
    gap[np.arange(len(index)), index] = np.asarray(confidence, dtype=np.float64) - np.asarray(correct, dtype=np.float64)
    return ratio(np.abs(counts @ gap).sum(axis=1), counts.sum(axis=1), np.nan)


class RankedScores:
    """One score column and its binary labels, sorted once; ranking metrics of any count matrix.

    Args:
        scores: a score per row (higher: more likely positive); compared as given, so ties are the
            ties of these values.
        positive: the label per row (truthy: positive).
    """

    def __init__(self, scores: np.ndarray, positive: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        self.order = np.argsort(-scores, kind="stable")
        ranked = scores[self.order]
        self.starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # first row of each run of tied scores
        self.positive = np.asarray(positive, dtype=bool).reshape(-1)[self.order].astype(np.float64)

    def _per_score(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted positives and negatives per distinct score, highest score first: two ``(b, scores)`` arrays."""
        drawn = as_float(counts)[:, self.order]
        positives = np.add.reduceat(drawn * self.positive, self.starts, axis=1)
        return positives, np.add.reduceat(drawn, self.starts, axis=1) - positives

    def auroc(self, counts: np.ndarray) -> np.ndarray:
        """Per resample: the area under the ROC curve (a tie between a positive and a negative counts
        half); NaN without both classes."""
        positives, negatives = self._per_score(counts)
        total_pos, total_neg = positives.sum(axis=1), negatives.sum(axis=1)
        below = total_neg[:, None] - np.cumsum(negatives, axis=1)  # negatives scored strictly lower
        return ratio((positives * (below + 0.5 * negatives)).sum(axis=1), total_pos * total_neg, np.nan)

    def average_precision(self, counts: np.ndarray) -> np.ndarray:
        """Per resample: the precision at each distinct score threshold weighted by the recall it adds
        (torchmetrics' ``binary_average_precision``); NaN without positives."""
        positives, negatives = self._per_score(counts)
        true_pos = np.cumsum(positives, axis=1)
        precision = ratio(true_pos, true_pos + np.cumsum(negatives, axis=1))
        return ratio((positives * precision).sum(axis=1), positives.sum(axis=1), np.nan)


def binary_classification(scores: np.ndarray, target: np.ndarray) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """AUROC, and accuracy and F1 of ``score > 0.5`` (torchmetrics' binary threshold), of resamples:
    a function of a count matrix. ``scores``: P(positive) per row (e.g. moved so that the operating
    threshold lands on 0.5); ``target``: 0/1 per row."""
    scores, actual = np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(target).reshape(-1) == 1
    ranked, predicted = RankedScores(scores, actual), scores > 0.5
    return lambda counts: {"auroc": ranked.auroc(counts), "accuracy": weighted_mean(counts, predicted == actual), "f1": f1(counts, predicted, actual)}


def multiclass_classification(scores: np.ndarray, target: np.ndarray, auroc: bool = True) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Macro AUROC (one class against the rest; NaN unless every class was drawn), accuracy (micro),
    macro F1 and per-class F1 (``f1_per_class``, ``(b, classes)``) of the argmax of ``scores``
    ``(N, classes)``, as torchmetrics' multi-class metrics give them, of resamples."""
    scores, target = np.asarray(scores, dtype=np.float64), np.asarray(target).reshape(-1).astype(int)
    classes = scores.shape[1]
    predicted = scores.argmax(axis=1)
    ranked = [RankedScores(scores[:, c], target == c) for c in range(classes)] if auroc else []
    target_onehot = np.eye(classes)[target]

    def values(counts: np.ndarray) -> dict[str, np.ndarray]:
        macro, per_class = macro_f1(counts, predicted, target, classes)
        out = {"accuracy": weighted_mean(counts, predicted == target), "f1": macro, "f1_per_class": per_class}
        if ranked:
            every_class = (as_float(counts) @ target_onehot > 0).all(axis=1)
            out["auroc"] = np.where(every_class, np.mean([r.auroc(counts) for r in ranked], axis=0), np.nan)
        return out

    return values
