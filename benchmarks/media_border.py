"""Is there a frame near the border of generated images? Edge profiles of sample grids against the real shapes.

``python -m benchmarks.media_border GRID.png [GRID.png ...] [--size 32] [--rings 6]``

Each grid is a ``plots/*_samples.png`` of a media run (tiles found as the non-white blocks of the figure and
resized back to ``--size`` pixels). A frame is a line parallel to the border at a fixed distance in every
image: luminance changes sharply *across* the ring of pixels at that distance and little *along* it. So for
each distance ``d`` from the border (0: between the outermost ring and the next) the script reports the mean
absolute luminance step across the ring (to ring ``d + 1``) divided by the mean step along it, over all
images. The real shapes set (``make_shape_images``, seed 0, 1536 images: stripes at random angles) gives
about 1.0-1.1 at every ``d``; a frame gives a ratio well above that at its distance.
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


def edge_ratios(images: np.ndarray, rings: int) -> np.ndarray:
    """Per distance ``d`` < ``rings``: mean |luminance step| across ring ``d`` / mean |step| along it (corners left out)."""
    size = images.shape[1]
    luminance = images @ np.array([0.299, 0.587, 0.114])
    down, right = np.abs(np.diff(luminance, axis=1)), np.abs(np.diff(luminance, axis=2))  # (N, size-1, size), (N, size, size-1)
    ratios = []
    for d in range(rings):
        inner, far = slice(d + 1, size - 1 - d), size - 2 - d
        across = np.concatenate([down[:, d, inner], down[:, far, inner], right[:, inner, d], right[:, inner, far]], 1)
        along_inner = slice(d + 1, size - 2 - d)
        along = np.concatenate([right[:, d, along_inner], right[:, size - 1 - d, along_inner], down[:, along_inner, d], down[:, along_inner, size - 1 - d]], 1)
        ratios.append(across.mean() / along.mean())
    return np.array(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.media_border", description=__doc__.split("\n\n")[0])
    parser.add_argument("grids", nargs="+", type=Path)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rings", type=int, default=6)
    args = parser.parse_args(argv)
    real, _ = make_shape_images(1536, size=args.size, seed=0)
    sets = {"real shapes (1536)": real.astype(np.float64) / 255}
    sets.update({f"{path} ({len(tiles)})": tiles for path in args.grids for tiles in [grid_tiles(path, args.size)]})
    print("mean |luminance step| across the ring at distance d from the border / along it (real images: ~1.0-1.1)")
    print(f"{'images':<64}" + "".join(f"{'d=' + str(d):>7}" for d in range(args.rings)))
    for name, images in sets.items():
        print(f"{name[-64:]:<64}" + "".join(f"{r:>7.2f}" for r in edge_ratios(images, args.rings)))


if __name__ == "__main__":
    main()
