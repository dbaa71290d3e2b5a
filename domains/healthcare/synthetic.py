"""A deterministic synthetic lesion data set, generated on the fly: no download needed.

Three classes on a textured tissue background: ``normal`` (no lesion), ``benign`` (a smooth,
round, well-defined blob) and ``malignant`` (an irregular, spiculated blob with a darker core).
Lesion size, position, contrast and background vary, so the task is learnable but not trivial.
Class frequencies are imbalanced (60/25/15 %) like a screening population.

Where each lesion lies is known (:func:`lesion_masks`), so explanations can be checked against it.

Example:
    >>> images, labels = make_lesion_images(8, size=32, seed=0)
    >>> images.shape, images.dtype, labels.shape
    ((8, 32, 32), dtype('uint8'), (8,))
    >>> masks = lesion_masks(8, size=32, seed=0)
    >>> bool((masks.any(axis=(1, 2)) == (labels > 0)).all())  # a lesion, and only a lesion, where the class has one
    True
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = ("normal", "benign", "malignant")
CLASS_FREQUENCIES = (0.60, 0.25, 0.15)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.normal(0.0, 1.0, (size // 8 + 2, size // 8 + 2))
    yy, xx = np.meshgrid(np.linspace(0, coarse.shape[0] - 1.001, size), np.linspace(0, coarse.shape[1] - 1.001, size), indexing="ij")
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = yy - y0, xx - x0
    smooth = (
        coarse[y0, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1, x0] * fy * (1 - fx)
        + coarse[y0, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1, x0 + 1] * fy * fx
    )  # fmt: skip
    return 0.45 + 0.08 * smooth + rng.normal(0.0, 0.04, (size, size))


#: a pixel belongs to the lesion where the lesion adds more than this to the intensity (about 5 grey levels of 255)
LESION_LEVEL = 0.02


def _lesion(rng: np.random.Generator, size: int, malignant: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    radius = rng.uniform(0.10, 0.2) * size
    angle = np.arctan2(yy - cy, xx - cx)
    distance = np.hypot(yy - cy, xx - cx)
    if malignant:
        spikes = rng.integers(5, 9)
        boundary = radius * (1 + 0.35 * np.sin(spikes * angle + rng.uniform(0, 2 * np.pi)) + 0.15 * rng.normal())
        core = np.exp(-((distance / (0.4 * radius)) ** 2))
        return np.clip(1.2 - distance / np.maximum(boundary, 1e-3), 0, 1) * (0.35 - 0.25 * core)
    return 0.3 * np.exp(-((distance / radius) ** 4))


def _draw(seed: int, index: int, size: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Image ``index`` of the set (floats), its class and its lesion mask (empty for ``normal``)."""
    rng = np.random.default_rng([seed, index])
    label = int(np.searchsorted(np.cumsum(CLASS_FREQUENCIES), rng.uniform(0, 1)))
    image = _background(rng, size)
    mask = np.zeros((size, size), dtype=bool)
    if label > 0:
        lesion = _lesion(rng, size, malignant=label == 2)
        image, mask = image + lesion, lesion > LESION_LEVEL
    return image, label, mask


def _check(count: int, size: int) -> None:
    if count < len(CLASS_NAMES):
        raise ValueError(f"synthetic_samples must be at least {len(CLASS_NAMES)}, got {count}")
    if size < 16:
        raise ValueError(f"synthetic image size must be at least 16 pixels, got {size}")


def make_lesion_images(count: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``count`` grayscale ``size x size`` uint8 images and their class indices.

    Image ``i`` depends only on ``(seed, i)``, so any subset is reproducible on its own.
    """
    _check(count, size)
    images = np.empty((count, size, size), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for index in range(count):
        image, labels[index], _ = _draw(seed, index, size)
        images[index] = np.clip(image * 255, 0, 255).astype(np.uint8)
    return images, labels


def lesion_masks(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Where the lesion of each image of :func:`make_lesion_images` (same arguments) lies: ``(count, size, size)``
    booleans, true where the lesion adds more than :data:`LESION_LEVEL` to the intensity; all false for ``normal``."""
    _check(count, size)
    return np.stack([_draw(seed, index, size)[2] for index in range(count)])
