"""The pixel cache of ``--data.streaming true --data.cache_dir DIR``: every image of a source decoded, checked and
resized once, stored as one memory-mapped array.

A cache is the folder ``<source>-<key digest>`` holding ``pixels.bin`` (every item of the source in its
order, ``count x C x *spatial``, uint8 when every image is 8-bit, else float32 in [0, 1]) and
``meta.json`` (count, shape, dtype, the SHA-256 of ``pixels.bin``). Its key is what decides the pixels:
the content of the image files (their SHA-256s in order; an ``.npz``'s SHA-256; the synthetic set's
options) and the transform (the served shape, so ``--data.image_size`` and 2-D/3-D, and the
intensity rule); a changed file or transform makes another folder.

- Complete or absent: built under a temporary name and renamed (:func:`pipelines.cache_folders.building`);
  a refused image removes the half-built folder.
- DDP: the runner reads the data before the trainer starts, so rank 0 builds the cache before the
  other ranks exist; ranks started together (``torchrun``) each build their own temporary folder, the
  first rename wins, and every rank maps the same cache.
- Checked when opened: a ``meta.json`` that does not parse, a ``pixels.bin`` of the wrong size or with
  another SHA-256 (a truncated or damaged copy) is named on stderr, removed and rebuilt, never used.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from domains.healthcare.lazy_pixels import LazyPixels, MappedPixels, block_items
from pipelines.cache_folders import COMPLETE, building, default_cache, digest_of, discard
from pipelines.files import sha256_file
from pipelines.images import unit_float

FORMAT = 1


def _promote(path: Path) -> None:
    """Rewrite a uint8 ``pixels.bin`` as float32 in [0, 1] (a deeper image came after 8-bit ones), in bounded chunks."""
    converted = path.with_name(path.name + ".float32")
    with open(path, "rb") as source, open(converted, "wb") as target:
        while chunk := source.read(1 << 22):
            target.write(unit_float(np.frombuffer(chunk, np.uint8)).tobytes())
    os.replace(converted, path)


class PixelCache:
    """The cache folder of one source and transform in ``cache_dir`` (default ``$XDG_CACHE_HOME/domain-pipelines/healthcare``)."""

    def __init__(self, cache_dir: str | Path | None, name: str, key: dict[str, Any]) -> None:
        self.root = Path(cache_dir) if cache_dir else default_cache("healthcare")
        self.folder = self.root / f"{name}-{digest_of({'format': FORMAT, **key})}"

    def problem(self) -> str | None:
        """Why the folder is not a usable cache (absent, unreadable, wrong size, another checksum), or ``None``."""
        try:
            meta = json.loads((self.folder / COMPLETE).read_text())
            expected = meta["count"] * int(np.prod(meta["sample_shape"])) * np.dtype(meta["dtype"]).itemsize
            size = (self.folder / "pixels.bin").stat().st_size
        except FileNotFoundError as error:
            return "absent" if not self.folder.exists() else f"{Path(error.filename).name} is missing"
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"unreadable meta.json ({error})"
        if meta.get("format") != FORMAT:
            return f"format {meta.get('format')}, expected {FORMAT}"
        if size != expected:
            return f"pixels.bin holds {size} bytes, expected {expected} ({meta['count']} images of {meta['sample_shape']} {meta['dtype']})"
        if sha256_file(self.folder / "pixels.bin") != meta["sha256"]:
            return "pixels.bin does not match its recorded SHA-256"
        return None

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / COMPLETE).read_text())

    def ensure(self, every: LazyPixels) -> None:
        """Use the folder when it is a complete cache; otherwise (absent or damaged) build it from ``every`` item of the source."""
        problem = self.problem()
        if problem is None:
            return
        if self.folder.exists():  # a folder without a readable meta.json was not completed by building(): damaged too
            print(f"[healthcare] pixel cache {self.folder} is damaged ({problem}): removed and rebuilt", file=sys.stderr)
            discard(self.folder)
        with building(self.folder) as partial:
            path, dtype = partial / "pixels.bin", None
            out = open(path, "wb")
            try:
                for block in every.blocks(block_items(every.sample_shape)):
                    if dtype is None:
                        dtype = block.dtype
                    elif block.dtype != dtype and dtype == np.uint8:
                        out.close()
                        _promote(path)
                        out, dtype = open(path, "ab"), np.dtype(np.float32)
                    out.write(np.ascontiguousarray(block if block.dtype == dtype else unit_float(block)).tobytes())
            finally:
                out.close()
            meta = {"format": FORMAT, "count": len(every), "sample_shape": list(every.sample_shape), "dtype": str(np.dtype(dtype or np.uint8)),
                    "sha256": sha256_file(path)}  # fmt: skip
            (partial / COMPLETE).write_text(json.dumps(meta))

    def items(self, indices: np.ndarray) -> MappedPixels:
        meta = self.meta
        return MappedPixels(self.folder, indices, tuple(meta["sample_shape"]), meta["dtype"])
