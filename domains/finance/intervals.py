"""Bootstrap intervals of finance's labelled test metrics, over row counts (:mod:`pipelines.weighted_metrics`).

The values are those ``FraudDetector._ranking_metrics`` and its probability metrics give on the
resampled rows (torchmetrics' AUROC, average precision, precision/recall/F1 at the threshold and at
the alert budget; ECE and Brier of the fraud probability), computed for 1000 resamples in a few
array operations. A resample without both classes has no values (NaN), as a test set without them
has none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from domains.finance.figures import unit_interval
from pipelines.bootstrap import bootstrap_count_intervals
from pipelines.calibration import BINS
from pipelines.weighted_metrics import RankedScores, calibration_error, f1, rate, weighted_mean


def labelled_metric_intervals(scores: torch.Tensor, labels: torch.Tensor, threshold: float, budget_threshold: float, probability: Any | None) -> dict[str, dict[str, Any]]:
    """Percentile bootstrap intervals of the labelled test metrics; ``probability``: the fitted score-to-probability map, or None."""
    return bootstrap_count_intervals(len(scores), resampled_values(scores, labels, threshold, budget_threshold, probability))


def resampled_values(scores: torch.Tensor, labels: torch.Tensor, threshold: float, budget_threshold: float, probability: Any | None) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The labelled test metrics of a batch of resamples ``(b, rows)`` of these rows: ``{name: b values}``."""
    fraud = labels.detach().cpu().numpy().reshape(-1) == 1
    ranked = RankedScores(unit_interval(scores).detach().cpu().numpy(), fraud)
    raw = scores.detach().double().cpu().numpy().reshape(-1)
    flagged, at_budget = raw >= float(threshold), raw >= float(budget_threshold)
    probs = probability(scores).detach().double().cpu().numpy().reshape(-1) if probability is not None else None

    def values(counts: np.ndarray) -> dict[str, np.ndarray]:
        both = (counts @ fraud > 0) & (counts @ ~fraud > 0)
        out = {
            "test/auroc": ranked.auroc(counts), "test/auprc": ranked.average_precision(counts),
            "test/precision_at_budget": rate(counts, fraud, at_budget), "test/recall_at_budget": rate(counts, at_budget, fraud),
            "test/precision": rate(counts, fraud, flagged), "test/recall": rate(counts, flagged, fraud), "test/f1": f1(counts, flagged, fraud),
            "test/alert_rate": weighted_mean(counts, flagged),
        }  # fmt: skip
        if probs is not None:
            out["test/ece"] = calibration_error(counts, probs, fraud, BINS)
            out["test/brier"] = weighted_mean(counts, (probs - fraud) ** 2)
        return {name: np.where(both, value, np.nan) for name, value in out.items()}

    return values
