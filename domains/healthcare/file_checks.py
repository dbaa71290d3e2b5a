"""Checks that every file of a labels CSV is the kind of image its first file is: dimensions, channels, size
(unless resized), under ``--data.intensity_range`` the kind of values it stores and, under the bit-depth rule,
how much of its bit depth its values use (:func:`same_depth_use`; :mod:`domains.healthcare.readers`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

from pipelines.errors import InputError
from pipelines.images import Intensity, stored_bits

#: a file of 16 bits or more whose values all stay below ``2**LOW_BITS`` (4096) uses 12 bits or fewer of its depth
LOW_BITS = 12
#: files decoded, once a mix is found, to name a second example of each kind (the refusal's path only)
EXAMPLE_READS = 32
#: tables whose 16-bit files mix 12-bit use with whole-depth use, already noted (a warning, once per table and process)
_DEPTH_NOTES: set[Path] = set()


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


@dataclass(frozen=True)
class DepthUse:
    """How a file's integer values use its bit depth: ``low`` for a file of 16 bits or more whose values stay at or
    below 4095 (12-bit scanner data saved in a 16-bit PNG/TIFF: the bit-depth rule reads it about 16 times darker)."""

    bits: int
    peak: int

    @property
    def low(self) -> bool:
        return self.bits >= 16 and self.peak < 2**LOW_BITS

    def described(self, row: int, path: Path) -> str:
        return f"row {row} {path} ({self.bits}-bit, max {self.peak})"


def depth_use(path: Path, array: np.ndarray) -> DepthUse | None:
    """``array`` as read by the bit-depth rule (uint8, or float32 ``value / (2**bits - 1)``): its depth and largest stored
    value; the header is read only for a float array. ``None`` for files of float values or physical units."""
    if array.dtype == np.uint8:
        return DepthUse(8, int(array.max()))
    bits = stored_bits(path) if array.dtype.kind == "f" else None
    if bits is None or bits <= 8:
        return None
    return DepthUse(bits, int(np.rint(float(array.max()) * (2**bits - 1))))


def same_depth_use(found: DepthUse | None, expected: DepthUse, row: int, files: list[Path], use_of: Callable[[int], DepthUse | None], csv_path: Path) -> None:
    """Refuse a table mixing 16-bit files whose values use 12 bits or fewer with 8-bit files that use their whole depth:
    each is divided by its own depth's maximum, so the first kind trains about 16 times darker in silence. Among 16-bit
    files alone, a few with values of 4095 or less may be dark (underexposed) images, not 12-bit data: a warning names
    the first such pair and nothing is refused (a new-user trial's underexposed 16-bit images were refused). ``found`` is data row ``row``'s use, ``expected`` the first file's; ``use_of(i)`` reads item ``i``'s
    (to name a second example of each kind: up to :data:`EXAMPLE_READS` more files, on the refusal's path only)."""
    if found is None or found.low == expected.low:
        return
    if found.bits == expected.bits:  # 16-bit files alike: a dark (underexposed) image looks just like 12-bit data
        low, whole = (found, row, files[row - 1]), (expected, 1, files[0])
        if expected.low:
            low, whole = whole, low
        if csv_path not in _DEPTH_NOTES:  # said once per table (per process); refused only across stored depths (below)
            _DEPTH_NOTES.add(csv_path)
            rank_zero_warn(
                f"{csv_path}: {low[0].described(low[1], low[2])} uses 12 bits or fewer of its depth, while "
                f"{whole[0].described(whole[1], whole[2])} uses all of it (only the first such pair is named). If some files are 12-bit "
                f"scanner data saved in 16-bit files, they train about 16 times darker than the others: rescale them (values x 16). "
                f"Dark (underexposed) 16-bit images are fine as they are"
            )
        return
    examples: dict[bool, list[tuple[int, str]]] = {expected.low: [(1, expected.described(1, files[0]))], found.low: [(row, found.described(row, files[row - 1]))]}
    for index in [i for i in range(1, len(files)) if i != row - 1][:EXAMPLE_READS]:
        if all(len(kind) >= 2 for kind in examples.values()):
            break
        try:
            use = use_of(index)
        except InputError:  # a file with its own problem is named when it is read; here it only is no example
            continue
        if use is not None and len(examples[use.low]) < 2:
            examples[use.low].append((index + 1, use.described(index + 1, files[index])))
    low, whole = ("; ".join(text for _, text in sorted(examples[kind])) for kind in (True, False))
    raise InputError(
        f"{csv_path}: the table mixes 16-bit images whose values use 12 bits or fewer (max 4095 or less: {low}) "
        f"with images that use their whole bit depth ({whole}). Every file is divided by its bit depth's "
        f"maximum (65535 for 16 bits), so the 12-bit ones would train about 16 times darker than the others, in silence. "
        f"Rescale the 12-bit files to their depth (values x 16, or save them as 8-bit) so that every file uses its whole depth, "
        f"or split the table into one per kind"
    )
