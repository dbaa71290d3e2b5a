"""Small matplotlib figures shared by the domains.

Figures are built with matplotlib's object API (:func:`new_figure`: a ``matplotlib.figure.Figure``
on an Agg canvas, never registered with ``pyplot``), so drawing one needs no display, switches no
backend and leaves nothing open: library code changes no process-wide matplotlib state.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(rows: int = 1, columns: int = 1, figsize: tuple[float, float] = (6.4, 4.8), squeeze: bool = True) -> tuple[Figure, Any]:
    """``(figure, axes)`` like ``pyplot.subplots``, on an Agg canvas of its own (no pyplot, no backend switch).

    Example:
        >>> figure, axes = new_figure(2, 3, squeeze=False)
        >>> axes.shape, type(figure.canvas).__name__
        ((2, 3), 'FigureCanvasAgg')
    """
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def image_grid(images: torch.Tensor | np.ndarray, titles: Sequence[str] | None = None, columns: int = 8) -> Figure:
    """A grid of ``(N, C, H, W)`` images (C = 1 or 3), each min-max scaled for display, with titles."""
    array = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, dtype=float)
    count = len(array)
    rows = max(1, -(-count // columns))
    cols = min(columns, max(count, 1))
    fig, axes = new_figure(rows, cols, figsize=(1.6 * cols, (1.6 + 0.2 * title_lines(titles)) * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= count:
            continue
        image = array[i]
        image = image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1)
        low, high = image.min(), image.max()
        ax.imshow((image - low) / (high - low + 1e-8), cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    return fig


def title_lines(titles: Sequence[str] | None) -> int:
    """The most lines a title of ``titles`` has (0 without titles): grids leave room for them."""
    return max((str(t).count("\n") + 1 for t in titles or ()), default=0)


def save_figure_atomic(figure: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG, complete or absent: written to a name of this process, then
    renamed (two processes writing the same plot, e.g. two sweep workers, never collide)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.png")
    try:
        figure.savefig(partial, dpi=110, bbox_inches="tight")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def metric_figure(metric: Any, value: Any, panels: Sequence[str] | None = None, **options: Any) -> Figure:
    """A torchmetrics metric's own drawing (``metric.plot(value, ax=...)``) on a figure of ours.

    Without ``ax`` torchmetrics asks pyplot for a figure (global state, left open); here it draws on
    :func:`new_figure`. ``panels``: ``value`` holds one result per name (a multilabel confusion
    matrix, ``[N, 2, 2]``), each drawn on its own axis titled ``Label <name>``. ``options`` go to
    ``plot`` (``labels``, ``score``...).

    Example:
        >>> from torchmetrics.classification import MultilabelConfusionMatrix
        >>> metric = MultilabelConfusionMatrix(num_labels=3)
        >>> metric.update(torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.8, 0.4]]), torch.tensor([[1, 0, 0], [0, 1, 1]]))
        >>> figure = metric_figure(metric, metric.compute(), panels=["effusion", "nodule", "mass"])
        >>> [axis.get_title() for axis in figure.axes if axis.get_title()], type(figure.canvas).__name__
        (['Label effusion', 'Label nodule', 'Label mass'], 'FigureCanvasAgg')
    """
    if panels is None:
        figure, axis = new_figure(figsize=(5.5, 4.5))
        metric.plot(value, ax=axis, **options)
        return figure
    columns = int(np.ceil(np.sqrt(len(panels))))
    rows = -(-len(panels) // columns)
    figure, axes = new_figure(rows, columns, figsize=(3.6 * columns, 3.4 * rows), squeeze=False)
    for axis, part, name in zip(axes.flat, value, panels):
        metric.plot(part, ax=axis, **options)
        axis.set_title(f"Label {name}")
    for axis in axes.flat[len(panels) :]:
        axis.remove()
    figure.tight_layout()
    return figure


def release_pyplot_figure(figure: Any) -> None:
    """Close a figure a library drew through pyplot (Optuna, Lightning's Tuner) so that pyplot lets it go;
    nothing to do for a figure of :func:`new_figure` (pyplot never held it) or when pyplot was never imported."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)
