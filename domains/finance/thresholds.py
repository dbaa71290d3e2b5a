"""Alert thresholds of :class:`domains.finance.model.FraudAutoencoder`, from validation scores.

- :func:`budget_threshold`: the score that flags the top ``alert_rate`` share of rows (the alert budget);
- :func:`best_f1_threshold`: the threshold with the best F1 on labelled rows (cut only between
  different scores, so tied rows are flagged together).
"""

from __future__ import annotations

import math

import torch


def budget_threshold(scores: torch.Tensor, alert_rate: float) -> float:
    """The score at or above which ``alert_rate`` of ``scores`` fall (at least one row)."""
    ordered = scores.double().sort(descending=True).values
    k = min(len(ordered), max(1, math.ceil(alert_rate * len(ordered))))
    return float(ordered[k - 1])


def best_f1_threshold(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The threshold (flag ``score >= t``) with the best F1 on labelled rows, and that F1."""
    ordered, order = scores.double().sort(descending=True)
    hits = labels[order].double()
    tp = hits.cumsum(0)
    flagged = torch.arange(1, len(hits) + 1, dtype=torch.float64, device=hits.device)
    f1 = 2 * tp / (flagged + hits.sum())
    cut = torch.ones_like(f1, dtype=torch.bool)
    cut[:-1] = ordered[:-1] != ordered[1:]  # only cut between different scores
    f1 = torch.where(cut, f1, torch.full_like(f1, -1.0))
    best = int(f1.argmax())
    return float(ordered[best]), float(f1[best])
