"""Small matplotlib figures shared by the domains.

Figures are built with matplotlib's object API (:func:`new_figure`: a ``matplotlib.figure.Figure``
on an Agg canvas, never registered with ``pyplot``), so drawing one needs no display, switches no
backend and leaves nothing open: library code changes no process-wide matplotlib state.
"""

from __future__ import annotations

import os
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
