"""Alert thresholds of :class:`domains.finance.model.FraudAutoencoder`, from validation scores.

- :func:`budget_threshold`: the score that flags the top ``alert_rate`` share of rows (the alert budget);
- :func:`fit_budget`: the budget threshold on rows that look like production traffic (the validation
  rows labelled normal; all of them without labels) and a record of what it was fitted on
  (:mod:`pipelines.monitor_budget`, saved in the checkpoint and the bundle);
- :func:`best_f1_threshold`: the threshold with the best F1 on labelled rows (cut only between
  different scores, so tied rows are flagged together).
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.monitor_budget import fit_record, top_share_threshold


def budget_threshold(scores: torch.Tensor, alert_rate: float) -> float:
    """The score at or above which ``alert_rate`` of ``scores`` fall (at least one row)."""
    return top_share_threshold(scores.detach().double().cpu().numpy(), alert_rate)


def fit_budget(scores: torch.Tensor, labels: torch.Tensor | None, alert_rate: float) -> tuple[float, dict[str, Any]]:
    """The budget threshold and what it was fitted on.

    A semi-supervised validation split holds a large share of the data's fraud (a quarter of its rows
    on ADBench campaign), so its top ``alert_rate`` share is mostly fraud: on real traffic that cut
    flagged far less than the budget. The rows labelled normal are what most production traffic is;
    without labels (``labels`` None) every validation row is used. After deployment the threshold is
    refitted on recent traffic with ``python -m pipelines.monitor MODEL WINDOW --recalibrate_budget OUT``.
    """
    if labels is None:
        threshold = budget_threshold(scores, alert_rate)
        return threshold, fit_record("validation rows (unlabelled)", len(scores), alert_rate, threshold)
    normal = scores[labels == 0]
    threshold = budget_threshold(normal, alert_rate)
    return threshold, fit_record("validation rows labelled normal", len(normal), alert_rate, threshold, validation_rows=int(len(scores)))


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
