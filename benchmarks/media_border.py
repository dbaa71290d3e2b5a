"""Is there a frame near the border of generated images? Ring profiles of sample grids against the real shapes.

``python -m benchmarks.media_border GRID.png [GRID.png ...] [--size 32] [--rings 8]``

Each grid is a ``plots/*_samples.png`` of a media run (tiles found as the non-white blocks of the figure and
resized back to ``--size`` pixels). For every image, the mean luminance of each ring of pixels at distance
``d`` = 0, 1, ... from the nearest border is taken relative to the mean of the image's first ``--rings`` rings;
the profile is the average of that over the images (with its standard error). On the real shapes set the
stripes run at random angles and phases, so its profile is flat (within its error); a frame artefact shows
as a ring darker or brighter than its neighbours in every image, i.e. a profile value far outside the real
set's ("off real": the difference from the real profile, x1000, at the ring where it is largest in units of the
grid's standard error). The real reference is ``make_shape_images`` (the embedded set, seed 0, 1536 images).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from domains.media.synthetic import make_shape_images


def _blocks(mask: np.ndarray, min_length: int) -> list[tuple[int, int]]:
    blocks, start = [], None
    for index, on in enumerate(list(mask) + [False]):
        if on and start is None:
            start = index
        elif not on and start is not None:
            if index - start >= min_length:
                blocks.append((start, index))
            start = None
    return blocks


def grid_tiles(path: Path, size: int) -> np.ndarray:
    """The tiles of a sample grid figure as ``(N, size, size, 3)`` floats in [0, 1]."""
    figure = np.asarray(Image.open(path).convert("RGB"))
    ink = (figure < 245).any(2)
    columns = _blocks(ink.mean(0) > 0.5, size)
    rows = _blocks(ink.mean(1) > 0.5, size)
    tiles = [Image.fromarray(figure[r0:r1, c0:c1]).resize((size, size), Image.BOX) for r0, r1 in rows for c0, c1 in columns]
    return np.stack([np.asarray(t, dtype=np.float64) / 255 for t in tiles])


def ring_profile(images: np.ndarray, rings: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over images of (ring luminance - mean of the first ``rings`` rings)."""
    size = images.shape[1]
    index = np.arange(size)
    distance = np.minimum.outer(np.minimum(index, size - 1 - index), np.minimum(index, size - 1 - index))
    luminance = images @ np.array([0.299, 0.587, 0.114])
    per_ring = np.stack([luminance[:, distance == d].mean(1) for d in range(rings)], 1)
    relative = per_ring - per_ring.mean(1, keepdims=True)
    return relative.mean(0), relative.std(0, ddof=1) / np.sqrt(len(images))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.media_border", description=__doc__.split("\n\n")[0])
    parser.add_argument("grids", nargs="+", type=Path)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rings", type=int, default=8)
    args = parser.parse_args(argv)
    real, _ = make_shape_images(1536, size=args.size, seed=0)
    sets = {"real shapes (1536)": real.astype(np.float64) / 255}
    sets.update({f"{path} ({len(tiles)})": tiles for path in args.grids for tiles in [grid_tiles(path, args.size)]})
    print("luminance of ring d (pixels from the border) minus the mean of rings 0..%d, x1000 (+- standard error)" % (args.rings - 1))
    print(f"{'images':<60}" + "".join(f"{'d=' + str(d):>13}" for d in range(args.rings)) + f"{'off real':>16}")
    reference = ring_profile(sets["real shapes (1536)"], args.rings)[0]
    for name, images in sets.items():
        mean, error = ring_profile(images, args.rings)
        cells = "".join(f"{1000 * m:>7.0f} +-{1000 * e:>3.0f}" for m, e in zip(mean, error))
        worst = int(np.argmax(np.abs(mean - reference) / np.maximum(error, 1e-3)))  # the ring furthest from the real profile, in errors
        print(f"{name[-60:]:<60}{cells}{1000 * (mean - reference)[worst]:>6.0f} at d={worst}")


if __name__ == "__main__":
    main()
