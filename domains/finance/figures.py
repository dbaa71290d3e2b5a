"""Test-time figures of the finance model: the score histogram and the precision-recall curve."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import binary_average_precision, binary_precision, binary_precision_recall_curve, binary_recall

from pipelines.plots import new_figure


def unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Map non-negative scores monotonically into [0, 1) (``s / (1 + s)`` in float64).

    torchmetrics applies a sigmoid to predictions outside [0, 1], which would saturate large
    reconstruction errors into ties; this map keeps their order exactly.
    """
    s = scores.double().clamp_min(0.0)
    return s / (1.0 + s)


def score_histogram(scores: torch.Tensor, labels: torch.Tensor | None, thresholds: dict[str, float]) -> Any:
    """Histogram of log10 scores, normal vs fraud when labelled, with the thresholds as vertical lines."""
    values = torch.log10(scores.clamp_min(1e-6)).cpu().numpy()
    fig, ax = new_figure(figsize=(6, 3.6))
    bins = np.histogram_bin_edges(values, bins=60)  # shared by both classes
    if labels is None:
        ax.hist(values, bins=bins, histtype="stepfilled", color="tab:blue", alpha=0.7, label="all rows")
    else:
        mask = labels.cpu().numpy() > 0.5
        ax.hist(values[~mask], bins=bins, histtype="stepfilled", color="tab:blue", alpha=0.6, density=True, label=f"normal ({int((~mask).sum())})")
        ax.hist(values[mask], bins=bins, histtype="stepfilled", color="tab:red", alpha=0.6, density=True, label=f"fraud ({int(mask.sum())})")
    for (name, value), style in zip(thresholds.items(), ("-", "--")):
        if math.isfinite(value):
            ax.axvline(math.log10(max(float(value), 1e-6)), color="black", linestyle=style, label=f"{name} {float(value):.3g}")
    ax.set_xlabel("log10 anomaly score")
    ax.set_ylabel("density" if labels is not None else "rows")
    ax.set_title("Test scores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

def pr_curve(scores: torch.Tensor, labels: torch.Tensor, thresholds: dict[str, float]) -> Any:
    """Precision-recall curve (scores mapped by ``unit_interval``) with the thresholds' operating points."""
    precision, recall, _ = binary_precision_recall_curve(unit_interval(scores), labels.long())
    ap = float(binary_average_precision(unit_interval(scores), labels.long()))
    fig, ax = new_figure(figsize=(4.5, 4))
    ax.plot(recall.cpu().numpy(), precision.cpu().numpy(), color="tab:red", label=f"AP {ap:.3f}")
    ax.axhline(float(labels.mean()), color="gray", linestyle=":", label=f"fraud rate {float(labels.mean()):.3f}")
    for (name, value), marker in zip(thresholds.items(), ("o", "s")):
        if math.isfinite(value):
            flagged = (scores >= value).long()
            p = float(binary_precision(flagged, labels.long()))
            r = float(binary_recall(flagged, labels.long()))
            ax.plot([r], [p], marker=marker, color="black", linestyle="none", label=f"{name} (P {p:.2f}, R {r:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall (test)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
