"""A deterministic synthetic image set: coloured shapes on textured backgrounds (no download).

Three classes, one shape per image: ``circle``, ``square`` and ``triangle``. Each shape has a
saturated random colour, a random size, position and (square, triangle) rotation; the background is
a muted two-colour stripe texture at a random angle and frequency with a little pixel noise. The
shapes are large and high-contrast, so a small GAN or diffusion model draws recognisable ones after a
couple of minutes on a CPU, while colour, pose and texture vary enough that memorising is not enough.

Example:
    >>> images, labels = make_shape_images(4, size=32, seed=0)
    >>> images.shape, images.dtype, labels.tolist()
    ((4, 32, 32, 3), dtype('uint8'), [2, 1, 2, 1])
"""

from __future__ import annotations

import colorsys

import numpy as np

CLASS_NAMES = ("circle", "square", "triangle")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    hue = rng.uniform()
    value = rng.uniform(0.3, 0.5)
    saturation = rng.uniform(0.1, 0.35)
    low, high = _hsv(hue, saturation, value), _hsv(hue + 0.05, saturation, value + rng.uniform(0.08, 0.16))
    angle = rng.uniform(0, np.pi)
    frequency = rng.uniform(2.0, 5.0)
    phase = rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    return low * (1 - wave[..., None]) + high * wave[..., None]


def _shape_mask(rng: np.random.Generator, label: int, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    radius = rng.uniform(0.20, 0.32)
    cy, cx = rng.uniform(0.5 - (0.45 - radius), 0.5 + (0.45 - radius), 2)
    dy, dx = yy - cy, xx - cx
    soft = 1.0 / size  # one pixel of anti-aliasing
    if label == 0:  # circle: signed distance to the rim
        distance = np.hypot(dy, dx) - radius
    else:
        theta = rng.uniform(0, 2 * np.pi)
        ry, rx = np.cos(theta) * dy - np.sin(theta) * dx, np.sin(theta) * dy + np.cos(theta) * dx
        if label == 1:  # square with half-side ~ radius * 0.85
            distance = np.maximum(np.abs(ry), np.abs(rx)) - radius * 0.85
        else:  # equilateral triangle inscribed in the radius
            edges = []
            for k in range(3):
                normal = np.pi / 2 + k * 2 * np.pi / 3
                edges.append(np.cos(normal) * rx + np.sin(normal) * ry - radius * 0.6)
            distance = np.max(edges, axis=0)
    return np.clip(0.5 - distance / soft, 0.0, 1.0)


def make_shape_images(count: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``count`` RGB ``size x size`` uint8 images ``(N, H, W, 3)`` and their shape labels.

    Image ``i`` depends only on ``(seed, i)``, so any subset is reproducible on its own. Classes are
    balanced in expectation.
    """
    if count < len(CLASS_NAMES):
        raise ValueError(f"synthetic_samples must be at least {len(CLASS_NAMES)}, got {count}")
    if size < 8:
        raise ValueError(f"synthetic image size must be at least 8 pixels, got {size}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size + 0.5 / size
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        label = int(rng.integers(len(CLASS_NAMES)))
        image = _background(rng, yy, xx)
        mask = _shape_mask(rng, label, yy, xx, size)[..., None]
        colour = _hsv(rng.uniform(), rng.uniform(0.75, 1.0), rng.uniform(0.85, 1.0))
        image = image * (1 - mask) + colour * mask + rng.normal(0.0, 0.02, image.shape)
        images[index] = np.clip(image * 255, 0, 255).astype(np.uint8)
        labels[index] = label
    return images, labels
