"""Where a split's pixels come from: decoded into memory, or (``--data.streaming true``) read lazily or from the pixel cache.

:class:`SplitPixels` is what :class:`domains.healthcare.data.MedicalImageDataModule` asks for the images
of a split or of ``--data.predict_dir``; the array-likes it hands out are described in
:mod:`domains.healthcare.lazy_pixels`, the cache in :mod:`domains.healthcare.pixel_cache`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from domains.healthcare.lazy_pixels import LazyPixels, TrainingStatistics, block_items
from domains.healthcare.pixel_cache import PixelCache
from domains.healthcare.readers import LabeledImages, image_files, read_image_file, resized
from pipelines.data import default_workers
from pipelines.errors import InputError
from pipelines.images import Intensity, unit_float, value_units

#: how a refusal names the training split's pixels (as the in-memory path always has)
TRAINING_PIXELS = "the training images after resizing"


class SplitPixels:
    """The pixels of ``source`` served at ``image_shape`` (``resize`` applied) by the data module's options.

    Args:
        source: gives the labelled images (their reader, :mod:`domains.healthcare.readers`); called only when a
            split is read (``predict`` on ``predict_dir`` from a checkpoint reads no source).
        image_shape: channel-first shape of one model input.
        resize: a MONAI ``Resize`` to ``image_shape``, or ``None``.
        intensity: the intensity rule (part of the cache's key; reads ``predict_dir`` files).
        streaming: read lazily (``False``: decode each split into memory, as before).
        cache_dir: the pixel cache's folder (with ``streaming``), or ``None``.
        num_workers: the loader's worker option (the check pass and the cache build decode with as many).
        label: the source's name (the cache folder's prefix).
    """

    def __init__(self, source: Callable[[], LabeledImages], image_shape: tuple[int, ...], resize: Any, intensity: Intensity, streaming: bool,
                 cache_dir: str | None, num_workers: int | None, label: str) -> None:  # fmt: skip
        self._source, self.image_shape, self.resize, self.intensity = source, tuple(image_shape), resize, intensity
        self.streaming, self.cache_dir, self.workers, self.label = streaming, cache_dir, default_workers(num_workers), label
        self.block = block_items(self.image_shape)

    @property
    def source(self) -> LabeledImages:
        return self._source()

    @cached_property
    def cache(self) -> PixelCache | None:
        """The pixel cache (complete after this: built from every item of the source when absent or damaged), or ``None``."""
        if not (self.streaming and self.cache_dir):
            return None
        key = {"content": self.source.content(), "shape": list(self.image_shape), "intensity": str(self.intensity)}
        cache = PixelCache(self.cache_dir, Path(self.label).stem.replace(" ", "-"), key)
        cache.ensure(self._lazy(self._item, np.arange(len(self.source.labels))))
        return cache

    def _item(self, index: int) -> np.ndarray:
        return self.source.item(index, self.resize)

    def _lazy(self, read: Any, indices: np.ndarray, dtype: Any = None) -> LazyPixels:
        return LazyPixels(read, indices, self.image_shape, dtype, workers=self.workers)

    def split(self, indices: np.ndarray, statistics: TrainingStatistics | None = None) -> Any:
        """Items ``indices`` of the source: an array in memory, or with ``streaming`` a :class:`MappedPixels` of the cache
        or :class:`LazyPixels` read once here to check every image (fitting ``statistics`` in that pass)."""
        if not self.streaming:
            return self.source.load(indices, self.resize)
        if self.cache is not None:
            return self.cache.items(indices)
        lazy = self._lazy(self._item, indices)
        for block in lazy.blocks(self.block):
            if statistics is not None:
                statistics.add(block, TRAINING_PIXELS)
        return lazy

    def unlabelled(self, folder: Path, units: str | None = None) -> tuple[list[Path], Any]:
        """The image files of ``--data.predict_dir`` and their pixels (float32 in [0, 1]), every file read and checked
        (with ``--data.intensity range``, against ``units``: the kind of values the training files stored)."""
        files = image_files(folder)

        def read(i: int) -> np.ndarray:
            try:
                array = resized(read_image_file(files[i], self.intensity), self.resize)
            except InputError as error:
                raise InputError(f"--data.predict_dir: {error}") from None
            found = value_units(files[i]) if units is not None and self.intensity.mode == "range" else None
            if found is not None and found[0] != units:
                low, high = self.intensity.range  # type: ignore[misc]
                raise InputError(
                    f"--data.predict_dir: {files[i]} stores {found[1]}, but the model was trained on files storing {units} "
                    f"mapped by --data.intensity_range [{low:g}, {high:g}]: its values would land in another band of brightness "
                    "and be scored in silence. Predict on files of the training kind (e.g. the DICOMs rather than PNG exports)"
                )
            if tuple(array.shape) != self.image_shape:
                raise InputError(f"--data.predict_dir: image {files[i]} has shape {tuple(array.shape)}, the model takes {self.image_shape}; {_shape_fix(array.shape, self.image_shape)}")
            return unit_float(array)

        indices = np.arange(len(files))
        if not self.streaming:
            return files, np.stack([read(i) for i in indices])
        lazy = self._lazy(read, indices, np.float32)
        for _ in lazy.blocks(self.block):
            pass  # every image read and checked before anything is predicted
        return files, lazy


def _shape_fix(found: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """What to do about an image of another shape: its channels differ (no option converts colour; trial
    finding: the refusal advised --data.image_size), or its size does (``--data.image_size`` resizes).

    Example:
        >>> _shape_fix((3, 32, 32), (1, 32, 32))
        'it has 3 channels (colour), the model was trained on 1 (grayscale): convert the file to grayscale (e.g. PIL `Image.open(path).convert("L")`)'
        >>> _shape_fix((1, 64, 64), (1, 32, 32))
        'set --data.image_size to resize every image to the training size'
    """
    if tuple(found[1:]) == tuple(expected[1:]) or found[0] != expected[0]:
        names = {1: "grayscale", 3: "colour", 4: "colour with alpha"}
        convert = 'convert("L")' if expected[0] == 1 else 'convert("RGB")'
        return (f"it has {found[0]} channels ({names.get(found[0], 'channels')}), the model was trained on {expected[0]} "
                f"({names.get(expected[0], 'channels')}): convert the file to {names.get(expected[0], 'that many channels')} (e.g. PIL `Image.open(path).{convert}`)")  # fmt: skip
    return "set --data.image_size to resize every image to the training size"
