"""Bootstrap intervals over row counts give, resample by resample, the values torchmetrics gives on
the resampled rows: ranking metrics with ties, metrics at a threshold, calibration error, Brier and
class-weighted losses, for finance, healthcare (binary and multi-class), autonomous classification
and the shared calibration metrics. Resamples without a class give NaN where torchmetrics' value
is undefined."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.functional.classification import (
    auroc,
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
    binary_precision,
    binary_recall,
    f1_score,
    accuracy,
    multiclass_accuracy,
    multiclass_f1_score,
)

from domains.autonomous.evaluation import _classification_values
from domains.finance.figures import unit_interval
from domains.finance.intervals import resampled_values
from domains.healthcare.intervals import resampled_test_values
from pipelines.bootstrap import bootstrap_count_intervals, bootstrap_intervals, resample_counts
from pipelines.calibration import brier_score, expected_calibration_error, rates_at
from pipelines.classifier_calibration import ClassifierCalibration, decision_centred
from pipelines.weighted_metrics import RankedScores

ROWS = 120


def rows_of(counts: np.ndarray) -> torch.Tensor:
    """The row indices one resample drew (each row as often as its count)."""
    return torch.as_tensor(np.repeat(np.arange(len(counts)), counts))


def resamples(rows: int = ROWS, count: int = 40) -> np.ndarray:
    """Bootstrap count matrices, plus one resample that drew a single row again and again (one class only)."""
    counts = next(resample_counts(rows, count, seed=3))
    lonely = np.zeros((1, rows), dtype=counts.dtype)
    lonely[0, 5] = rows
    return np.concatenate([counts, lonely])


def close(weighted: np.ndarray, reference: list[float]) -> None:
    reference = np.asarray(reference, dtype=np.float64)
    assert np.array_equal(np.isnan(weighted), np.isnan(reference)), (weighted, reference)
    np.testing.assert_allclose(weighted[~np.isnan(weighted)], reference[~np.isnan(reference)], rtol=1e-6, atol=1e-7)


def test_counts_are_seeded_resamples_of_every_row():
    first, again = (np.concatenate(list(resample_counts(50, 30, seed=1, chunk_elements=400))) for _ in range(2))
    assert first.shape == (30, 50) and (first.sum(axis=1) == 50).all() and np.array_equal(first, again)
    assert not np.array_equal(first, np.concatenate(list(resample_counts(50, 30, seed=2))))


def test_ranking_metrics_with_ties_match_torchmetrics_per_resample():
    generator = torch.Generator().manual_seed(0)
    scores = (torch.rand(ROWS, generator=generator) * 10).round() / 10  # many ties
    labels = (torch.rand(ROWS, generator=generator) < 0.3).long()
    ranked, counts = RankedScores(scores.numpy(), labels.numpy()), resamples()
    reference_auroc, reference_ap = [], []
    for resample in counts:
        rows = rows_of(resample)
        both = 0 < int(labels[rows].sum()) < len(rows)
        reference_auroc.append(float(binary_auroc(scores[rows], labels[rows])) if both else float("nan"))
        reference_ap.append(float(binary_average_precision(scores[rows], labels[rows])) if labels[rows].any() else float("nan"))
    close(ranked.auroc(counts), reference_auroc)
    close(ranked.average_precision(counts), reference_ap)


def test_finance_intervals_are_the_logged_metrics_of_each_resample():
    generator = torch.Generator().manual_seed(1)
    labels = (torch.rand(ROWS, generator=generator) < 0.2).long()
    scores = torch.rand(ROWS, generator=generator).double() * 3 + 2.0 * labels
    threshold, budget = 2.5, 3.5
    probability = lambda s: torch.sigmoid(s - 2.5)  # noqa: E731 - a fitted score-to-probability map
    values = resampled_values(scores, labels, threshold, budget, probability)(counts := resamples())
    expected: dict[str, list[float]] = {name: [] for name in values}
    for resample in counts:
        rows = rows_of(resample)
        s, y = scores[rows], labels[rows]
        if not 0 < int(y.sum()) < len(y):
            for name in expected:
                expected[name].append(float("nan"))
            continue
        flagged, at_budget, probs = (s >= threshold).long(), (s >= budget).long(), probability(s)
        reference = {
            "test/auroc": binary_auroc(unit_interval(s), y), "test/auprc": binary_average_precision(unit_interval(s), y),
            "test/precision_at_budget": binary_precision(at_budget, y), "test/recall_at_budget": binary_recall(at_budget, y),
            "test/precision": binary_precision(flagged, y), "test/recall": binary_recall(flagged, y), "test/f1": binary_f1_score(flagged, y),
            "test/alert_rate": flagged.double().mean(), "test/ece": expected_calibration_error(probs, y), "test/brier": brier_score(probs, y),
        }  # fmt: skip
        for name in expected:
            expected[name].append(float(reference[name]))
    for name, weighted in values.items():
        close(weighted, expected[name])


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_healthcare_intervals_are_the_logged_metrics_of_each_resample(task):
    generator = torch.Generator().manual_seed(2)
    classes = 2 if task == "binary" else 3
    target = torch.randint(0, classes, (ROWS,), generator=generator)
    outputs = 1 if task == "binary" else classes
    logits = torch.randn(ROWS, outputs, generator=generator) + (target[:, None].float() if task == "binary" else 2 * nn.functional.one_hot(target, classes))
    names = ["benign", "malignant"] if task == "binary" else ["a", "b", "c"]
    if task == "binary":
        loss_fn, threshold = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0])), 0.4
        probs = torch.sigmoid(logits[:, 0])
    else:
        loss_fn, threshold = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5])), None
        probs = torch.softmax(logits, dim=1)
    values = resampled_test_values(logits, target, probs, threshold, loss_fn, names)(counts := resamples())
    expected: dict[str, list[float]] = {name: [] for name in values}
    for resample in counts:
        rows = rows_of(resample)
        y = target[rows]
        if task == "binary":
            p = decision_centred(probs[rows], threshold)
            every = int(y.unique().numel()) == 2
            reference = {"test/auroc": binary_auroc(p, y) if every else torch.tensor(float("nan")), "test/accuracy": accuracy(p, y, task="binary"),
                         "test/f1": f1_score(p, y, task="binary"), "test/loss": loss_fn(logits[rows][:, 0], y.float())}  # fmt: skip
        else:
            args = {"task": "multiclass", "num_classes": classes}
            every = int(y.unique().numel()) == classes
            per_class = f1_score(probs[rows], y, **args, average="none")
            reference = {"test/auroc": auroc(probs[rows], y, **args, average="macro") if every else torch.tensor(float("nan")),
                         "test/accuracy": accuracy(probs[rows], y, **args), "test/f1": f1_score(probs[rows], y, **args, average="macro"),
                         "test/loss": loss_fn(logits[rows], y), **{f"test/f1_{n}": per_class[i] for i, n in enumerate(names)}}  # fmt: skip
        for name in expected:
            expected[name].append(float(reference[name]))
    assert set(values) == set(expected) and "test/auroc" in values
    for name, weighted in values.items():
        close(weighted, expected[name])


@pytest.mark.parametrize("binary", [True, False])
def test_calibration_and_autonomous_intervals_are_the_logged_metrics_of_each_resample(binary):
    generator = torch.Generator().manual_seed(4)
    classes = 2 if binary else 4
    targets = torch.randint(0, classes, (ROWS,), generator=generator)
    logits = torch.randn(ROWS, 1 if binary else classes, generator=generator)
    calibration = ClassifierCalibration(binary, True, "cost" if binary else "fixed", 0.9, 1.0, 1.0)
    calibration.state.temperature.fill_(1.7)
    calibration.state.threshold.fill_(0.45)
    counts = resamples()
    values = calibration.resampled_values(logits, targets)(counts)
    if not binary:
        values |= _classification_values(logits, targets)(counts)
    expected: dict[str, list[float]] = {name: [] for name in values}
    for resample in counts:
        rows = rows_of(resample)
        probs, y = calibration.probabilities(logits[rows]), targets[rows]
        reference = {"test/ece": expected_calibration_error(probs, y), "test/brier": brier_score(probs, y)}
        if binary:
            rates = rates_at(probs, y, calibration.threshold)
            reference |= {"test/sensitivity": rates["sensitivity"], "test/specificity": rates["specificity"]}
        else:
            acc = float(multiclass_accuracy(logits[rows], y, num_classes=classes, average="micro"))
            reference |= {"test/accuracy": acc, "test/score": 1 - acc, "test/f1": multiclass_f1_score(logits[rows], y, num_classes=classes, average="macro")}
        for name in expected:
            expected[name].append(float(reference[name]))
    for name, weighted in values.items():
        close(weighted, expected[name])


def test_count_intervals_agree_with_the_row_index_form_and_cover_the_estimate():
    correct = np.array([1.0] * 85 + [0.0] * 35)
    by_counts = bootstrap_count_intervals(len(correct), lambda counts: {"acc": counts @ correct / len(correct)})["acc"]
    by_rows = bootstrap_intervals(len(correct), lambda rows: {"acc": correct[rows].mean()})["acc"]
    assert by_counts["resamples"] == by_rows["resamples"] == 1000
    assert by_counts["low"] < correct.mean() < by_counts["high"]
    # two seeded resamplings of the same data: intervals agree to within resampling noise
    assert abs(by_counts["low"] - by_rows["low"]) < 0.03 and abs(by_counts["high"] - by_rows["high"]) < 0.03
    assert bootstrap_count_intervals(len(correct), lambda counts: {"acc": counts @ correct / len(correct)})["acc"] == by_counts
