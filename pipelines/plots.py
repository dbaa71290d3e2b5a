"""Small matplotlib figures shared by the domains (the Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def image_grid(images: torch.Tensor | np.ndarray, titles: Sequence[str] | None = None, columns: int = 8) -> plt.Figure:
    """A grid of ``(N, C, H, W)`` images (C = 1 or 3), each min-max scaled for display, with titles."""
    array = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, dtype=float)
    count = len(array)
    rows = max(1, -(-count // columns))
    cols = min(columns, max(count, 1))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
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
