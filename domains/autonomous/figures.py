"""Test-time figures of the autonomous model: predicted against true values, and trajectories."""

from __future__ import annotations

from typing import Any

import torch

from pipelines.plots import new_figure


def confusion_figure(confusion: Any, labels: list[str]) -> Any:
    """The confusion matrix of a torchmetrics ``ConfusionMatrix`` (drawn by torchmetrics on a figure of our own)."""
    fig, ax = new_figure(figsize=(5, 5))
    confusion.plot(ax=ax, labels=labels)
    return fig


def scatter_figure(pairs: Any, name: str) -> Any:
    """Predicted against true values (``pairs``: ``(N, 2)`` true, predicted) with the diagonal."""
    fig, ax = new_figure(figsize=(4, 4))
    ax.scatter(pairs[:, 0], pairs[:, 1], s=6, alpha=0.5)
    low, high = pairs.min(), pairs.max()
    ax.plot([low, high], [low, high], "k--", lw=1)
    ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title="test: predicted vs true")
    return fig


def trajectory_figure(batch: dict[str, torch.Tensor], count: int, names: list[str] | None = None) -> Any:
    """Observed (blue), true future (green), predicted (red) and sampled (grey) trajectories of ``count`` windows.

    With two or more channels the first two are drawn against each other (a map view); with one,
    the channel is drawn against the step.
    """
    count = min(count, len(batch["past"]))
    cols = min(3, count)
    rows = -(-count // cols)
    fig, axes = new_figure(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    names = names or ["x", "y"]
    for i, ax in enumerate(axes.flat):
        if i >= count:
            ax.axis("off")
            continue
        past, future, single = batch["past"][i], batch["future"][i], batch["single"][i]
        obs = len(past)

        def draw(points: torch.Tensor, start: int = 0, **style: Any) -> None:
            if points.shape[-1] >= 2:
                ax.plot(points[:, 0], points[:, 1], **style)
            else:
                ax.plot(range(start, start + len(points)), points[:, 0], **style)

        for sample in batch.get("samples", torch.zeros(0, 0, 0, 0))[i][:20] if "samples" in batch else []:
            draw(torch.cat([past[-1:], sample]), obs - 1, color="0.6", lw=0.6, alpha=0.6)
        draw(past, 0, color="tab:blue", marker="o", ms=2, label="observed")
        draw(torch.cat([past[-1:], future]), obs - 1, color="tab:green", marker="o", ms=2, label="true")
        draw(torch.cat([past[-1:], single]), obs - 1, color="tab:red", marker="x", ms=3, label="predicted")
        if past.shape[-1] >= 2:
            ax.set(xlabel=names[0], ylabel=names[1])
        else:
            ax.set(xlabel="step", ylabel=names[0])
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
