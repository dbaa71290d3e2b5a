"""Images larger than memory (``--data.streaming true``): pixels read per item, statistics in one bounded pass.

Two array-likes stand where the in-memory path holds a ``(N, C, *spatial)`` array (``len``, ``shape``,
``dtype``, ``[i]``, ``[a:b]``), so :class:`domains.healthcare.datasets.ImageDataset` serves them unchanged:

- :class:`LazyPixels`: each item decoded (read, checked, resized) when asked for; the loader's worker
  processes decode in parallel (``--data.num_workers``).
- :class:`MappedPixels`: items of a pixel cache (:mod:`domains.healthcare.pixel_cache`), a memory map
  whose pages are handed back every ``release_items`` items served, so resident memory stays flat.

:meth:`LazyPixels.blocks` reads the items once in blocks of bounded size (decoded by loader workers,
in order): setup's check pass (every image read and checked before training, as in memory), the
cache's build, and the statistics. :class:`TrainingStatistics` fits, block by block, what the
in-memory path fits on the whole training array: per-channel mean and std (float64 sums combined by
Chan's formula: equal to numpy's ``mean``/``std`` of the whole array within 1e-6 relative; numpy
sums float32 pixels in float32) and the drift reference's per-image intensities (the same numbers:
each image's mean and std do not depend on the blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipelines.cache_folders import map_array, release
from pipelines.errors import InputError
from pipelines.images import check_finite_pixels, unit_float
from pipelines.reference import image_intensities, image_reference

#: the most pixel values (all channels) one block holds: 16 MiB as float64
BLOCK_VALUES = 1 << 21


def block_items(sample_shape: tuple[int, ...]) -> int:
    """Items per block for images of ``sample_shape`` (``BLOCK_VALUES`` pixel values, at least one image)."""
    return max(1, BLOCK_VALUES // int(np.prod(sample_shape)))


class _Decoding(Dataset):
    """Items for a loader's workers: the image, or the refusal's text (an exception raised in a worker reaches
    the main process wrapped in a traceback; the text is re-raised there as the refusal it was)."""

    def __init__(self, read: Callable[[int], np.ndarray], indices: np.ndarray) -> None:
        self.read, self.indices = read, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> np.ndarray | str:
        try:
            return self.read(int(self.indices[item]))
        except InputError as error:
            return str(error)


def _listed(items: list[Any]) -> list[Any]:
    return items


class ItemArray:
    """What :class:`LazyPixels` and :class:`MappedPixels` share with an array: ``len``, ``shape``, ``ndim``."""

    indices: np.ndarray
    sample_shape: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)


class LazyPixels(ItemArray):
    """Items ``indices`` of a source, each read by ``read(index)`` when asked for.

    Args:
        read: reads and checks one image channel-first (uint8, or float32 in [0, 1]); raises ``InputError``.
        indices: the source's item numbers, in the order served.
        sample_shape: the shape of one image as served (after resizing).
        dtype: the dtype served; ``None`` until :meth:`blocks` has read every item (uint8 when every image
            is 8-bit, else float32 in [0, 1]: what ``np.stack`` of the in-memory path gives).
        workers: loader worker processes decoding :meth:`blocks`.
    """

    def __init__(self, read: Callable[[int], np.ndarray], indices: np.ndarray, sample_shape: tuple[int, ...], dtype: Any = None, workers: int = 0) -> None:
        self.read, self.indices, self.sample_shape, self.workers = read, np.asarray(indices), tuple(sample_shape), workers
        self.dtype = np.dtype(dtype) if dtype is not None else None

    def _served(self, array: np.ndarray) -> np.ndarray:
        if self.dtype is None:
            raise RuntimeError("LazyPixels: items are served after blocks() has checked them (setup)")
        return unit_float(array) if array.dtype != self.dtype else array  # an 8-bit image among deeper ones

    def __getitem__(self, item: int | slice) -> np.ndarray:
        if isinstance(item, slice):
            return np.stack([self[i] for i in range(*item.indices(len(self)))]) if len(range(*item.indices(len(self)))) else np.zeros((0, *self.sample_shape), self.dtype)
        return self._served(self.read(int(self.indices[item])))

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        """Every item once, in order, ``size`` at a time (decoded by ``workers`` processes); the first refusal is raised.
        Fixes :attr:`dtype` when it was unknown."""
        # its own generator: the global one, which shuffles the training batches later, is left as it was
        loader = DataLoader(_Decoding(self.read, self.indices), batch_size=size, num_workers=self.workers, collate_fn=_listed, generator=torch.Generator())
        kinds: set[np.dtype] = set()
        for arrays in loader:
            refused = next((a for a in arrays if isinstance(a, str)), None)
            if refused is not None:
                raise InputError(refused)
            kinds.update(a.dtype for a in arrays)
            yield np.stack([unit_float(a) for a in arrays]) if len({a.dtype for a in arrays}) > 1 else np.stack(arrays)
        if self.dtype is None:
            self.dtype = np.dtype(np.uint8) if kinds <= {np.dtype(np.uint8)} else np.dtype(np.float32)


class MappedPixels(ItemArray):
    """Items ``indices`` of a pixel cache's ``pixels.bin`` (``count x sample_shape`` of ``dtype``), memory-mapped.

    Pages a read touched are handed back every ``release_items`` items served (the kernel's page cache keeps
    them), so the process's resident memory does not grow with the part of the cache an epoch read.
    """

    def __init__(self, folder: Path, indices: np.ndarray, sample_shape: tuple[int, ...], dtype: Any, release_items: int = 256) -> None:
        self.folder, self.indices, self.sample_shape, self.dtype = folder, np.asarray(indices), tuple(sample_shape), np.dtype(dtype)
        self.release_items = release_items
        self._map: tuple[Any, np.ndarray] | None = None
        self._unreleased = 0

    def __getstate__(self) -> dict[str, Any]:  # loader workers open their own map
        return {**self.__dict__, "_map": None}

    @property
    def pixels(self) -> np.ndarray:
        if self._map is None:
            self._map = map_array(self.folder / "pixels.bin", self.dtype, self.sample_shape)
        return self._map[1]

    def release(self) -> None:
        if self._map is not None:
            release([self._map[0]])
        self._unreleased = 0

    def __getitem__(self, item: int | slice) -> np.ndarray:
        rows = self.indices[item]
        values = np.array(self.pixels[rows])  # a copy: the map's pages can be released
        self._unreleased += np.size(rows)
        if self._unreleased >= self.release_items:
            self.release()
        return values

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self), size):
            yield self[start : start + size]
        self.release()


def blocks_of(images: Any, size: int) -> Iterator[np.ndarray]:
    """Blocks of ``size`` items of an in-memory array, :class:`LazyPixels` or :class:`MappedPixels`."""
    if hasattr(images, "blocks"):
        yield from images.blocks(size)
    else:
        for start in range(0, len(images), size):
            yield images[start : start + size]


class TrainingStatistics:
    """Per-channel mean and std of pixels in [0, 1] and each image's intensities, fitted block by block."""

    def __init__(self) -> None:
        self.count = 0  # pixel values per channel
        self.images = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.means: list[np.ndarray] = []
        self.stds: list[np.ndarray] = []

    def add(self, block: np.ndarray, where: str) -> None:
        """One block of images ``(B, C, *spatial)`` (uint8 = ``v / 255``, else floats in [0, 1]); ``where`` names it in a refusal."""
        if block.dtype.kind == "f":
            check_finite_pixels(block, where, first_item=self.images)
        scale = 255.0 if block.dtype == np.uint8 else 1.0
        values = np.moveaxis(block, 1, 0).reshape(block.shape[1], -1).astype(np.float64) / scale
        n = values.shape[1]
        mean = values.mean(axis=1)
        m2 = ((values - mean[:, None]) ** 2).sum(axis=1)
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = mean, m2
        else:  # Chan, Golub and LeVeque: two groups' means and squared deviations combined
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * n / total
            self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.count += n
        self.images += len(block)
        image_means, image_stds = image_intensities(block)
        self.means.append(image_means)
        self.stds.append(image_stds)

    def channels(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std (at least 1e-6), as the model normalises by them."""
        assert self.mean is not None and self.m2 is not None, "no training images"
        return self.mean.astype(float).tolist(), np.maximum(np.sqrt(self.m2 / self.count), 1e-6).astype(float).tolist()

    def reference(self, input_name: str, source: str) -> dict[str, Any]:
        """The drift reference of the images' intensities (:func:`pipelines.reference.image_reference`)."""
        return image_reference(np.concatenate(self.means), np.concatenate(self.stds), input_name, source)
