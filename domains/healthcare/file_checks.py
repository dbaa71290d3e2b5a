"""Checks that every file of a labels CSV is the kind of image its first file is: dimensions, channels, size
(unless resized) and, under ``--data.intensity_range``, the kind of values it stores (:mod:`domains.healthcare.readers`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.errors import InputError
from pipelines.images import Intensity


#: how Pillow's image modes read, for a channel-count refusal: a palette or alpha PNG can look gray in a viewer
_MODES = {"1": "1-bit", "L": "gray", "LA": "gray with alpha", "P": "a palette image", "PA": "a palette image with alpha", "RGB": "RGB",
          "RGBA": "RGB with alpha", "CMYK": "CMYK", "I": "32-bit gray", "I;16": "16-bit gray", "F": "float gray"}  # fmt: skip


def _file_mode(path: Path) -> str:
    """`` (PNG mode 'P': a palette image)`` for a file Pillow reads; empty for others (DICOM, NIfTI) or when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return f" ({image.format} mode {image.mode!r}: {_MODES.get(image.mode, 'see Pillow')})"
    except (OSError, UnidentifiedImageError, ValueError):
        return ""


def same_kind(array: np.ndarray, reference: np.ndarray, row: int, path: Path, first: Path, csv_path: Path, resizing: bool) -> None:
    """``array`` (as read) is the kind of image ``reference`` (the first file) is: dimensions, channels, and size unless resized."""
    if array.ndim != reference.ndim:
        kind = lambda a: f"a {a.ndim - 1}-D {'volume' if a.ndim == 4 else 'image'} of shape {tuple(a.shape[1:])}"  # noqa: E731
        raise InputError(f"{csv_path}: row {row}: {path} is {kind(array)} but {first} is {kind(reference)}; a data set is all 2-D images or all 3-D volumes")
    if array.shape[0] != reference.shape[0]:
        raise InputError(
            f"{csv_path}: row {row}: image {path} has {array.shape[0]} channel(s){_file_mode(path)} but {first} has "
            f"{reference.shape[0]}{_file_mode(first)}; all images of a data set need the same channel count (gray or RGB)"
        )
    if array.shape != reference.shape and not resizing:
        raise InputError(f"{csv_path}: row {row}: image {path} has size {array.shape[1:]} but {first} has {reference.shape[1:]}; set --data.image_size to resize them to one size")




def same_units(found: tuple[str, str], expected: tuple[str, str], where: str, reference: str, intensity: Intensity) -> None:
    """Refuse a file whose values are of another kind (:func:`pipelines.images.value_units`) than ``reference``'s
    under ``--data.intensity_range``, which maps every file's values alike."""
    if found[0] != expected[0]:
        low, high = intensity.range  # type: ignore[misc]
        raise InputError(
            f"{where} stores {found[1]} but {reference} stores {expected[1]}: --data.intensity_range [{low:g}, {high:g}] maps every "
            f"file's values alike, so the two kinds would land in different bands of brightness in silence. A data set (and the "
            f"files a model predicts) holds one kind: convert the files (e.g. export the PNGs from the DICOMs with their rescale), or keep them apart"
        )
