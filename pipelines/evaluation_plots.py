"""Evaluation figures that read at a glance: reliability diagram, confusion matrix with class names,
ROC curves with their AUC in the legend. Matplotlib's object API (``matplotlib.figure.Figure``):
no pyplot state, no backend switch, safe in any thread.

Example:
    >>> import torch
    >>> figure = confusion_figure(torch.tensor([[5, 1], [2, 7]]), ["benign", "malignant"])
    >>> [label.get_text() for label in figure.axes[0].get_xticklabels()]
    ['benign', 'malignant']
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from pipelines.calibration import expected_calibration_error, reliability_bins


def reliability_figure(curves: dict[str, torch.Tensor], labels: torch.Tensor, title: str = "Reliability diagram") -> Figure:
    """Observed frequency against predicted probability per bin for each named set of probabilities
    (e.g. ``{"uncalibrated": p0, "calibrated": p1}``; ECE in the legend), with the diagonal of
    perfect calibration and, below, how many predictions fall in each bin."""
    figure = Figure(figsize=(5.2, 6.0))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    binary = next(iter(curves.values())).ndim == 1 if curves else True
    for (name, probs), marker in zip(curves.items(), "os^v"):
        table = reliability_bins(probs, labels)
        filled = table["count"] > 0
        ece = expected_calibration_error(probs, labels)
        top.plot(table["confidence"][filled], table["frequency"][filled], marker=marker, linewidth=1.5, label=f"{name} (ECE {ece:.3f})")
        centres = (table["edges"][:-1] + table["edges"][1:]) / 2
        bottom.bar(centres, table["count"], width=table["edges"][1] - table["edges"][0], alpha=0.5, label=name)
    top.set_ylabel("observed share of positives" if binary else "accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(title)
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("predicted probability of the positive class" if binary else "confidence (probability of the predicted class)")
    bottom.set_ylabel("predictions (log)")
    bottom.set_yscale("log")
    figure.tight_layout()
    return figure


def threshold_text(threshold: float) -> str:
    """A decision threshold as text with the digits it needs to be read as itself (within 5e-5): an operating
    threshold of 0.4995 is not shown as the default 0.5.

    Example:
        >>> [threshold_text(t) for t in (0.5, 0.4995, 0.73, 0.123456)]
        ['0.5', '0.4995', '0.73', '0.1235']
    """
    for digits in range(3, 9):
        text = f"{threshold:.{digits}g}"
        if abs(float(text) - threshold) <= 5e-5:
            return text
    return f"{threshold:.9g}"


def confusion_figure(matrix: torch.Tensor | np.ndarray, class_names: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Counts with the true class down the side and the predicted class along the bottom, both named."""
    counts = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    size = max(3.6, 0.55 * len(class_names) + 2.4)
    figure = Figure(figsize=(size, size))
    axes = figure.subplots()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=list(class_names), rotation=45 if max(map(len, class_names)) > 6 else 0, ha="right" if max(map(len, class_names)) > 6 else "center")
    axes.set_yticks(ticks, labels=list(class_names))
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    limit = counts.max() / 2 if counts.size else 0
    for (row, column), value in np.ndenumerate(counts):
        axes.text(column, row, f"{int(value)}", ha="center", va="center", color="white" if value > limit else "black")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def roc_figure(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], aucs: dict[str, float], title: str = "ROC curve") -> Figure:
    """One ROC curve per name (``{name: (false positive rate, true positive rate)}``), AUC in the legend."""
    figure = Figure(figsize=(5.2, 5.0))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance (AUC 0.500)")
    for name, (fpr, tpr) in curves.items():
        axes.plot(np.asarray(fpr.detach().cpu()), np.asarray(tpr.detach().cpu()), linewidth=1.8, label=f"{name} (AUC {aucs[name]:.3f})")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("false positive rate (1 - specificity)")
    axes.set_ylabel("true positive rate (sensitivity)")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure
