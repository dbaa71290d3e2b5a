"""Readers for the image sources a hospital team has, with validation that names the bad file or row.

Every reader returns a :class:`LabeledImages`: the label table and split of every item, and a way
to load the pixels. Labels and splits are read eagerly (cheap) so that the model's shape can be
known before training; pixels are read by :meth:`LabeledImages.load`, which checks every image.

Sources:
- :func:`read_medmnist_npz`: the official MedMNIST key layout (``train_images``, ``train_labels``,
  ``val_*``, ``test_*``), 2-D gray or RGB, or 3-D volumes.
- :func:`read_image_table`: a CSV with ``path`` and ``label`` columns (``split`` optional; several
  labels separated by ``|`` make a multi-label task) and PNG/JPEG/BMP/TIFF/DICOM/NIfTI files read by
  :mod:`pipelines.images` (one intensity rule: integers by bit depth, see that module).
- :func:`synthetic_lesions`: the embedded default.
"""

from __future__ import annotations

import csv
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from domains.healthcare.file_checks import depth_use, same_depth_use, same_kind, same_units
from domains.healthcare.labels import check_label_counts, order_binary
from domains.healthcare.synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
from domains.healthcare.synthetic import make_lesion_images
from pipelines.cache_folders import digest_of
from pipelines.errors import InputError
from pipelines.files import sha256_file
from pipelines.images import Intensity, check_finite_pixels, open_npz, read_image, scale_integers, unit_float, value_units
from pipelines.csv_text import check_csv_text, check_delimiter
from pipelines.validation import check_unique_columns, describe_rows

SPLITS = ("train", "val", "test")
TASKS = ("binary", "multiclass", "multilabel")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz", ".bmp", ".tif", ".tiff")
MULTILABEL_SEPARATOR = "|"
Resize = Callable[[np.ndarray], Any]


@dataclass
class LabeledImages:
    """Labels, splits and a pixel loader for one data set.

    ``labels`` is ``(N,)`` class indices for binary/multi-class tasks or ``(N, K)`` 0/1 for multi-label.
    ``split`` holds ``train``/``val``/``test`` per item, or ``None`` when the source has no official split.
    ``load(indices, resize)`` returns ``(len(indices), C, *spatial)`` arrays (uint8, or float32 in
    [0, 1]); ``resize`` (a MONAI ``Resize``) is applied to each channel-first image first.
    ``item(index, resize)`` reads and checks one image (what ``load`` stacks; read lazily with
    ``--data.streaming true``), ``content()`` is a digest of the pixels' files (a pixel cache's key).
    """

    labels: np.ndarray
    class_names: list[str]
    task: str
    split: np.ndarray | None
    sample_shape: tuple[int, ...]
    load: Callable[[np.ndarray, Resize | None], np.ndarray]
    names: list[str]
    item: Callable[[int, Resize | None], np.ndarray]
    content: Callable[[], str]
    positive_reason: str | None = None
    units: str | None = None  # with --data.intensity range: the kind of values its files store (pipelines.images.value_units)

    @property
    def in_channels(self) -> int:
        return self.sample_shape[0]

    @property
    def spatial_dims(self) -> int:
        return len(self.sample_shape) - 1


def infer_task(labels: np.ndarray, num_classes: int) -> str:
    if labels.ndim == 2 and labels.shape[1] > 1:
        return "multilabel"
    return "binary" if num_classes == 2 else "multiclass"


def resized(array: np.ndarray, resize: Resize | None) -> np.ndarray:
    """Apply a MONAI ``Resize`` to one channel-first image (uint8 scaled to [0, 1] first); no-op without one."""
    if resize is None:
        return array
    return np.asarray(resize(unit_float(array)), dtype=np.float32)


def stacked(arrays: list[np.ndarray]) -> np.ndarray:
    """Images as one array; 8-bit and deeper files mixed become one float32 array in [0, 1]."""
    if len({a.dtype for a in arrays}) > 1:
        arrays = [unit_float(a) for a in arrays]
    return np.stack(arrays)


def _in_memory(pixels: np.ndarray, content: Callable[[], Any]) -> dict[str, Any]:
    """``load``, ``item`` and ``content`` of pixels held in memory (an ``.npz``, the synthetic set)."""

    def load(indices: np.ndarray, resize: Resize | None = None) -> np.ndarray:
        selected = pixels[indices]
        return selected if resize is None else np.stack([resized(image, resize) for image in selected])

    def item(index: int, resize: Resize | None = None) -> np.ndarray:
        return resized(pixels[index], resize)

    return {"load": load, "item": item, "content": lambda: digest_of(content())}


def _channels_first(images: np.ndarray, source: str) -> np.ndarray:
    """MedMNIST layouts -> (N, C, *spatial)."""
    if images.ndim == 3:  # (N, H, W) gray 2-D
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):  # (N, H, W, C) 2-D
        return np.moveaxis(images, -1, 1)
    if images.ndim == 4:  # (N, D, H, W) gray 3-D
        return images[:, None]
    raise InputError(f"{source}: images have shape {images.shape}; expected (N,H,W), (N,H,W,C) or (N,D,H,W)")


def _npz_pixels(images: np.ndarray, where: str) -> np.ndarray:
    """The bit-depth rule on an ``.npz`` array: uint8 kept (``v / 255``), uint16 / 65535, floats checked and in [0, 1]."""
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind == "f":
        check_finite_pixels(images, where)
        low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 1.0)
        if low < 0 or high > 1:
            raise InputError(f"{where}: floating-point pixels span [{low:g}, {high:g}]; floats are read as intensities in [0, 1] (nothing is clipped): rescale them, or store uint8/uint16")
        return images.astype(np.float32)
    if images.dtype == np.uint16:
        return scale_integers(images, 16)
    raise InputError(f"{where}: pixels of dtype {images.dtype}; expected uint8, uint16 or floats in [0, 1]")


def read_medmnist_npz(path: str | Path, class_names: Sequence[str] | None = None, positive_class: str | None = None) -> LabeledImages:
    """Read a MedMNIST ``.npz`` with its official splits.

    Raises:
        InputError: missing keys, mismatched image/label counts, non-finite pixels (named by split and
            item), labels outside the class list, a class with fewer than 2 items.
    """
    path = Path(path)
    with open_npz(path) as npz:
        expected = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
        missing = [key for key in expected if key not in npz.files]
        if missing:
            raise InputError(f"{path}: missing key(s) {missing}; a MedMNIST .npz has {expected}, found {sorted(npz.files)}")
        images, labels, split = [], [], []
        for name in SPLITS:
            x, y = npz[f"{name}_images"], npz[f"{name}_labels"]
            if len(x) != len(y):
                raise InputError(f"{path}: {name}_images has {len(x)} items but {name}_labels has {len(y)}")
            if len(x) == 0:
                raise InputError(f"{path}: {name}_images is empty; every split needs items")
            check_finite_pixels(y.reshape(len(y), -1).astype(np.float64) if y.dtype.kind == "f" else y, f"{path}: array '{name}_labels'")
            images.append(_npz_pixels(_channels_first(x, f"{path}: {name}_images"), f"{path}: array '{name}_images'"))
            labels.append(y.reshape(len(y), -1))
            split += [name] * len(x)
    shapes = {im.shape[1:] for im in images}
    if len(shapes) > 1:
        raise InputError(f"{path}: splits have different image shapes {sorted(shapes)}")
    dtypes = {im.dtype for im in images}
    pixels = np.concatenate(images if len(dtypes) == 1 else [unit_float(im) for im in images])
    raw = np.concatenate(labels)
    if raw.dtype.kind == "f" and not np.array_equal(raw, np.round(raw)):
        raise InputError(f"{path}: labels must be integers, found {raw[raw != np.round(raw)][0]!r}")
    label_array = raw.astype(np.int64)
    if label_array.min() < 0:
        raise InputError(f"{path}: labels must be non-negative, found {int(label_array.min())}")
    multilabel = label_array.shape[1] > 1
    num_classes = label_array.shape[1] if multilabel else int(label_array.max()) + 1
    if class_names is not None:
        if not multilabel and label_array.max() >= len(class_names):
            row = int(np.argmax(label_array[:, 0] >= len(class_names)))
            raise InputError(
                f"{path}: item {row} ({split[row]}) has label {int(label_array[row, 0])}, not in the "
                f"{len(class_names)} class_names {list(class_names)}"
            )
        num_classes = len(class_names)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if multilabel:
        if label_array.max() > 1:
            raise InputError(f"{path}: multi-label columns must hold 0 or 1, found {int(label_array.max())}")
        counts = Counter({name: int(label_array[:, i].sum()) for i, name in enumerate(names)})
    else:
        label_array = label_array[:, 0]
        counts = Counter({name: int((label_array == i).sum()) for i, name in enumerate(names)})
    if class_names is None:
        check_label_counts(counts, str(path), None)
    task = infer_task(label_array, num_classes)
    why = None
    if task == "binary":
        label_array, names, why = order_binary(label_array, names, positive_class, class_names, str(path))
    return LabeledImages(
        labels=label_array,
        class_names=names,
        task=task,
        split=np.asarray(split),
        sample_shape=tuple(pixels.shape[1:]),
        names=[f"{s}/{i}" for s, i in zip(split, range(len(split)))],
        **_in_memory(pixels, lambda: {"npz": sha256_file(path)}),
        positive_reason=why,
    )


def synthetic_lesions(count: int, size: int, seed: int) -> LabeledImages:
    images, labels = make_lesion_images(count, size, seed)
    pixels = images[:, None]
    return LabeledImages(
        labels=labels,
        class_names=list(SYNTHETIC_CLASSES),
        task="multiclass",
        split=None,
        sample_shape=tuple(pixels.shape[1:]),
        names=[f"synthetic/{i}" for i in range(count)],
        **_in_memory(pixels, lambda: {"synthetic": [count, size, seed]}),
    )


def read_image_file(path: Path, intensity: Intensity = Intensity()) -> np.ndarray:
    """Read one PNG/JPEG/BMP/TIFF/DICOM/NIfTI file channel-first by the intensity rule of
    :mod:`pipelines.images` (uint8 = ``v / 255``, else float32 in [0, 1]); a blank image is refused."""
    array = read_image(path, intensity)
    if array.size and array.min() == array.max() and intensity.mode != "minmax":
        value = float(unit_float(array.reshape(-1)[:1])[0])
        raise InputError(
            f"image {path}: every pixel holds the same value ({value:g} of [0, 1]): a blank image (failed export?) carries "
            "no finding to learn or predict; remove it from the data"
        )
    return array


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (by suffix, sorted; hidden files skipped), for ``--data.predict_dir``."""
    if not folder.is_dir():
        raise InputError(f"--data.predict_dir {folder}: not a folder")
    everything = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = [p for p in everything if p.name.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise InputError(f"--data.predict_dir {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) among its {len(everything)} file(s)")
    skipped = len(everything) - len(files)
    if skipped:
        print(f"[healthcare] predict_dir {folder}: {skipped} file(s) without an image suffix skipped", file=sys.stderr)
    return files


def _parse_labels(table: pd.DataFrame, csv_path: Path, class_names: Sequence[str] | None) -> tuple[np.ndarray, list[str], bool]:
    raw = table["label"].astype(str).str.strip()
    multilabel = raw.str.contains(MULTILABEL_SEPARATOR, regex=False).any()
    tokens = [[t.strip() for t in value.split(MULTILABEL_SEPARATOR) if t.strip()] for value in raw]
    empty = [row + 1 for row, labels in enumerate(tokens) if not labels]
    if empty:
        raise InputError(f"{csv_path}: {describe_rows(empty)} ({table['path'].iloc[empty[0] - 1]}): empty label; every image needs a label")
    counts: Counter = Counter(t for row in tokens for t in row)
    first_row = {}
    for row, labels in enumerate(tokens):
        for t in labels:
            first_row.setdefault(t, f"row {row + 1} ({table['path'].iloc[row]})")
    check_label_counts(counts, str(csv_path), class_names, first_row)
    names = list(class_names) if class_names is not None else sorted(counts)
    lookup = {name: i for i, name in enumerate(names)}
    if multilabel:
        encoded = np.zeros((len(tokens), len(names)), dtype=np.int64)
        for row, labels in enumerate(tokens):
            encoded[row, [lookup[t] for t in labels]] = 1
        return encoded, names, True
    return np.array([lookup[row[0]] for row in tokens], dtype=np.int64), names, False


def read_image_table(
    labels_csv: str | Path,
    image_dir: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    positive_class: str | None = None,
    intensity: Intensity = Intensity(),
) -> LabeledImages:
    """Read a ``path,label[,split]`` CSV; image paths are relative to ``image_dir`` (default: the CSV's folder).

    Raises:
        InputError: missing columns, unknown or confusable labels, rare classes, split names, missing
            files; unreadable, non-finite, blank and mismatched images are reported by
            :meth:`LabeledImages.load` with the CSV row.
    """
    csv_path = Path(labels_csv)
    if not csv_path.is_file():
        raise InputError(f"labels_csv {csv_path}: file not found")
    check_csv_text(csv_path)
    with open(csv_path, "rb") as handle:
        blank = not handle.read(1 << 16).strip() and not handle.read(1)
    if blank:
        raise InputError(f"labels_csv {csv_path}: the file is empty; expected a header line 'path,label[,split]', then one line per image")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"labels_csv {csv_path}: not a readable CSV ({str(error).strip()})") from None
    with open(csv_path, newline="", encoding="utf-8", errors="replace") as handle:  # pandas renames a repeated header x -> x.1
        header = [c.strip() for c in next(csv.reader(handle), [])]
    check_delimiter(header, str(csv_path))
    check_unique_columns(header, str(csv_path))
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise InputError(f"{csv_path}: missing column(s) {missing}; expected columns path,label[,split], found {list(table.columns)}")
    if table.empty:
        raise InputError(f"{csv_path}: no rows")
    root = Path(image_dir) if image_dir else csv_path.parent
    inside = os.path.normpath(os.path.abspath(root))
    for row, relative in enumerate(table["path"], start=1):  # lexical: a symlinked folder inside the root is fine
        target = os.path.normpath(os.path.abspath(root / relative))
        if os.path.commonpath([inside, target]) != inside:
            raise InputError(
                f"{csv_path}: row {row}: path {relative!r} points outside the image folder {root} (to {target}); expected a path "
                f"relative to --data.image_dir (default: the CSV's folder): set --data.image_dir to a folder that holds every image"
            )
    files = [root / p for p in table["path"]]
    absent = [(row + 1, str(f)) for row, f in enumerate(files) if not f.is_file()]
    if absent:
        raise InputError(f"{csv_path}: {len(absent)} image(s) not found, first: row {absent[0][0]}: {absent[0][1]}")
    first_seen: dict[Path, int] = {}
    for row, f in enumerate(files, start=1):
        earlier = first_seen.setdefault(f.resolve(), row)
        if earlier != row:  # a copy in train and one in test would inflate every test metric
            raise InputError(f"{csv_path}: row {row}: {f} is listed again (first at row {earlier}); each image must appear once, or the same image can land in two splits")
    labels, names, multilabel = _parse_labels(table, csv_path, class_names)
    split = None
    if "split" in table.columns:
        split = table["split"].str.strip().str.lower().to_numpy()
        bad = [(row + 1, s) for row, s in enumerate(split) if s not in SPLITS]
        if bad:
            raise InputError(f"{csv_path}: row {bad[0][0]}: split {bad[0][1]!r} is not one of {list(SPLITS)}")
    task = "multilabel" if multilabel else infer_task(labels, len(names))
    why = None
    if task == "binary":
        labels, names, why = order_binary(labels, names, positive_class, class_names, str(csv_path))

    def read(i: int) -> np.ndarray:
        try:
            return read_image_file(files[i], intensity)
        except InputError as error:
            raise InputError(f"{csv_path}: row {i + 1}: {error}") from None

    first = read(0)
    units = value_units(files[0]) if intensity.mode == "range" else None  # one LOW HIGH maps every file: one kind of values
    depth = depth_use(files[0], first) if intensity.mode == "bit_depth" else None  # 12-bit values in 16-bit files among others
    checked: set[int] = set()

    def item(index: int, resize: Resize | None = None) -> np.ndarray:
        array = read(index)
        same_kind(array, first, index + 1, files[index], files[0], csv_path, resize is not None)
        if index not in checked:  # once per file: the header checks, on the pixels read for the item anyway
            if units is not None:
                same_units(value_units(files[index]), units, f"{csv_path}: row {index + 1}: {files[index]}", f"{files[0]} (row 1)", intensity)
            if depth is not None:
                same_depth_use(depth_use(files[index], array), depth, index + 1, files, lambda i: depth_use(files[i], read(i)), csv_path)
            checked.add(index)
        return resized(array, resize)

    def load(indices: np.ndarray, resize: Resize | None = None) -> np.ndarray:
        return stacked([item(i, resize) for i in indices])

    return LabeledImages(
        labels=labels,
        class_names=names,
        task=task,
        split=split,
        sample_shape=tuple(first.shape),
        load=load,
        names=[str(p) for p in table["path"]],
        item=item,
        content=lambda: digest_of([sha256_file(f) for f in files]),
        positive_reason=why,
        units=units[0] if units else None,
    )
