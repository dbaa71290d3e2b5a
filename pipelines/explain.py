"""Explanations beside predictions: heat-map overlays and ``predict --explain``'s per-item files.

A task that can explain its predictions item by item has a method ``explanation_writer(predictions)``
returning a Lightning callback that writes them beside the predictions file (healthcare: Grad-CAM
heat maps, ``domains/healthcare/explain.py``); :func:`explanation_writer` asks for it and refuses
``--explain`` clearly for a task without one. What such a callback writes goes through
:class:`ExplanationFolder`: a folder named after the predictions file, complete or absent.

Heat maps are drawn by :func:`overlay_rgb` (the image in grey, the map in a colour scale over it) for
both the run's plots (:func:`overlay_grid`) and the per-item files.

Example:
    >>> import numpy as np
    >>> overlay_rgb(np.zeros((4, 4)), np.eye(4)).shape, overlay_rgb(np.zeros((4, 4)), np.eye(4)).dtype
    ((4, 4, 3), dtype('uint8'))
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: how strongly a heat map covers the image where the map is 1 (it fades out where the map is 0)
OVERLAY_ALPHA = 0.55


def explanation_writer(model: Any, predictions: Path) -> Any:
    """The callback that writes ``model``'s per-item explanations beside ``predictions`` (``predict --explain``).

    Raises:
        InputError: the model gives no per-item explanations, or cannot for its configuration.
    """
    make = getattr(model, "explanation_writer", None)
    if not callable(make):
        raise InputError(
            f"--explain: {type(model).__name__} gives no per-item explanations to write beside the predictions "
            "(healthcare image classifiers write Grad-CAM heat maps, autonomous models per-channel attribution columns); run predict without --explain"
        )
    return make(predictions)


def scaled(image: np.ndarray) -> np.ndarray:
    """An image's own minimum -> 0 and maximum -> 1 (display only; a constant image is 0)."""
    image = np.asarray(image, dtype=np.float64)
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """An ``(H, W)`` grey or ``(H, W, 3)`` colour image with an ``(H, W)`` heat map in [0, 1] over it, as uint8 RGB.

    The map is drawn in the ``jet`` colour scale with an opacity proportional to its value, so where it
    is 0 the image shows unchanged."""
    from matplotlib import colormaps  # imported when drawing: the runner imports this module to start any command

    base = scaled(image)
    base = np.repeat(base[..., None], 3, axis=-1) if base.ndim == 2 else base[..., :3]
    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0.0, 1.0)
    colour = colormaps["jet"](heat)[..., :3]
    weight = alpha * heat[..., None]
    return np.rint(255 * ((1 - weight) * base + weight * colour)).astype(np.uint8)


def display_plane(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """A channel-first image ``(C, H, W)`` or volume ``(C, D, H, W)`` as one displayable plane:
    ``(H, W)`` grey or ``(H, W, 3)`` colour; a volume shows its middle slice."""
    array = array.detach().float().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array, dtype=np.float64)
    if array.ndim == 4:
        array = array[:, array.shape[1] // 2]
    return array[0] if array.shape[0] == 1 else np.moveaxis(array[:3], 0, -1)


def heatmap_plane(heatmap: np.ndarray | torch.Tensor) -> np.ndarray:
    """An ``(H, W)`` or ``(D, H, W)`` heat map as the plane :func:`display_plane` shows (the middle slice)."""
    heatmap = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    return heatmap[heatmap.shape[0] // 2] if heatmap.ndim == 3 else heatmap


def overlay_grid(images: torch.Tensor | np.ndarray, heatmaps: torch.Tensor | np.ndarray, titles: Sequence[str], columns: int = 8) -> Figure:
    """A grid of channel-first images with their heat maps over them (one title each) and a colour bar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from pipelines.plots import new_figure, title_lines

    count = len(images)
    rows, cols = max(1, -(-count // columns)), min(columns, max(count, 1))
    figure, axes = new_figure(rows, cols, figsize=(1.6 * cols + 0.6, (1.6 + 0.2 * title_lines(titles)) * rows + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < count:
            ax.imshow(overlay_rgb(display_plane(images[i]), heatmap_plane(heatmaps[i])))
            ax.set_title(titles[i], fontsize=7)
    bar = figure.colorbar(ScalarMappable(Normalize(0, 1), "jet"), ax=list(axes.flat), fraction=0.03, pad=0.02)
    bar.set_label("heat map (1 = the image's strongest)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return figure


def item_file_stem(row: int, item: str) -> str:
    """A file name for row ``row`` of a predictions file and its item (a path or an id), safe on any file system.

    Example:
        >>> item_file_stem(7, "scans/patient 3/CT.dcm")
        '000007_scans_patient_3_CT.dcm'
    """
    return f"{row:06d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', str(item)).strip('_')[-80:]}"


class ExplanationFolder:
    """The folder of per-item explanation files beside a predictions file, complete or absent.

    ``predictions.csv`` gets ``predictions.<kind>/`` (``predictions.rank1.<kind>/`` under DDP). Files
    go to a hidden ``.<name>.partial`` folder, renamed when :meth:`finish` is called; :meth:`discard`
    removes what this predict wrote (the partial folder, and the finished one when the command fails
    after it). An existing folder of that name is refused when the object is made, before anything runs.
    """

    def __init__(self, predictions: Path, kind: str) -> None:
        self.predictions, self.kind = Path(predictions), kind
        self.path = self.folder_for(0)
        if self.path.exists():
            raise InputError(f"--explain: {self.path} already exists; earlier explanations are never overwritten, choose another --output name")
        self.partial: Path | None = None
        self.finished = False
        self.files = 0

    def folder_for(self, rank: int, world_size: int = 1) -> Path:
        stem = self.predictions.stem if world_size == 1 else f"{self.predictions.stem}.rank{rank}"
        return self.predictions.with_name(f"{stem}.{self.kind}")

    def start(self, rank: int = 0, world_size: int = 1) -> None:
        self.path = self.folder_for(rank, world_size)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        shutil.rmtree(self.partial, ignore_errors=True)  # a killed earlier predict's leftovers
        self.partial.mkdir(parents=True)
        self.finished, self.files = False, 0

    def relative(self, name: str) -> str:
        """How the predictions file names a file of the folder (relative to the run folder)."""
        return f"{self.path.name}/{name}"

    def write_png(self, name: str, rgb: np.ndarray) -> None:
        from PIL import Image

        assert self.partial is not None, "start() first"
        Image.fromarray(rgb).save(self.partial / name)
        self.files += 1

    def write_array(self, name: str, array: np.ndarray) -> None:
        assert self.partial is not None, "start() first"
        np.save(self.partial / name, array)
        self.files += 1

    def finish(self) -> Path | None:
        """Rename the partial folder to its final name (nothing is left when no item was written)."""
        if self.partial is None:
            return None
        if not self.files:
            shutil.rmtree(self.partial, ignore_errors=True)
            return None
        os.replace(self.partial, self.path)
        self.finished = True
        return self.path

    def discard(self) -> None:
        if self.partial is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
        if self.finished:
            shutil.rmtree(self.path, ignore_errors=True)
            self.finished = False
