"""Readers for the image sources a hospital team has, with validation that names the bad file or row.

Every reader returns a :class:`LabeledImages`: the label table and split of every item, and a way
to load the pixels. Labels and splits are read eagerly (cheap) so that the model's shape can be
known before training; pixels are read by :meth:`LabeledImages.load`, which checks every image.

Sources:
- :func:`read_medmnist_npz`: the official MedMNIST key layout (``train_images``, ``train_labels``,
  ``val_*``, ``test_*``), 2-D gray or RGB, or 3-D volumes.
- :func:`read_image_table`: a CSV with ``path`` and ``label`` columns (``split`` optional; several
  labels separated by ``|`` make a multi-label task) and PNG/JPEG/DICOM/NIfTI files read by MONAI.
- :func:`synthetic_lesions`: the embedded default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np
import pandas as pd

from domains.healthcare.synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
from domains.healthcare.synthetic import make_lesion_images

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
    """

    labels: np.ndarray
    class_names: list[str]
    task: str
    split: np.ndarray | None
    sample_shape: tuple[int, ...]
    load: Callable[[np.ndarray, Resize | None], np.ndarray]
    names: list[str]

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
    scaled = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array
    return np.asarray(resize(scaled), dtype=np.float32)


def _in_memory(pixels: np.ndarray) -> Callable[[np.ndarray, Resize | None], np.ndarray]:
    def load(indices: np.ndarray, resize: Resize | None = None) -> np.ndarray:
        selected = pixels[indices]
        return selected if resize is None else np.stack([resized(image, resize) for image in selected])

    return load


def _channels_first(images: np.ndarray, source: str) -> np.ndarray:
    """MedMNIST layouts -> (N, C, *spatial)."""
    if images.ndim == 3:  # (N, H, W) gray 2-D
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):  # (N, H, W, C) 2-D
        return np.moveaxis(images, -1, 1)
    if images.ndim == 4:  # (N, D, H, W) gray 3-D
        return images[:, None]
    raise ValueError(f"{source}: images have shape {images.shape}; expected (N,H,W), (N,H,W,C) or (N,D,H,W)")


def read_medmnist_npz(path: str | Path, class_names: Sequence[str] | None = None) -> LabeledImages:
    """Read a MedMNIST ``.npz`` with its official splits.

    Raises:
        ValueError: missing keys, mismatched image/label counts, labels outside the class list.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"npz_path {path}: file not found")
    with np.load(path, allow_pickle=False) as npz:
        expected = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
        missing = [key for key in expected if key not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; a MedMNIST .npz has {expected}, found {sorted(npz.files)}")
        images, labels, split = [], [], []
        for name in SPLITS:
            x, y = npz[f"{name}_images"], npz[f"{name}_labels"]
            if len(x) != len(y):
                raise ValueError(f"{path}: {name}_images has {len(x)} items but {name}_labels has {len(y)}")
            images.append(_channels_first(x, f"{path}:{name}_images"))
            labels.append(y.reshape(len(y), -1))
            split += [name] * len(x)
    shapes = {im.shape[1:] for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{path}: splits have different image shapes {sorted(shapes)}")
    pixels = np.concatenate(images)
    label_array = np.concatenate(labels).astype(np.int64)
    multilabel = label_array.shape[1] > 1
    num_classes = label_array.shape[1] if multilabel else int(label_array.max()) + 1
    if class_names is not None:
        if not multilabel and label_array.max() >= len(class_names):
            row = int(np.argmax(label_array[:, 0] >= len(class_names)))
            raise ValueError(
                f"{path}: item {row} ({split[row]}) has label {int(label_array[row, 0])}, not in the "
                f"{len(class_names)} class_names {list(class_names)}"
            )
        num_classes = len(class_names)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if not multilabel:
        label_array = label_array[:, 0]
    if label_array.min() < 0:
        raise ValueError(f"{path}: labels must be non-negative, found {int(label_array.min())}")
    return LabeledImages(
        labels=label_array,
        class_names=names,
        task=infer_task(label_array, num_classes),
        split=np.asarray(split),
        sample_shape=tuple(pixels.shape[1:]),
        load=_in_memory(pixels),
        names=[f"{s}/{i}" for s, i in zip(split, range(len(split)))],
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
        load=_in_memory(pixels),
        names=[f"synthetic/{i}" for i in range(count)],
    )


class ImageFileReader:
    """MONAI ``LoadImage`` with the reader chosen by file suffix (DICOM, NIfTI or PIL formats).

    Pixels keep the file's row order and dtype (uint8 PNGs stay uint8); MONAI is imported lazily
    because only the image-table path needs it.
    """

    def __init__(self) -> None:
        from monai.data import NibabelReader, PILReader, PydicomReader
        from monai.transforms import LoadImage

        def load(reader):
            return LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=None)

        self.dicom = load(PydicomReader(swap_ij=False))
        self.nifti = load(NibabelReader())
        self.pil = load(PILReader(reverse_indexing=False))

    def __call__(self, path: Path) -> np.ndarray:
        name = path.name.lower()
        loader = self.dicom if name.endswith(".dcm") else self.nifti if name.endswith((".nii", ".nii.gz")) else self.pil
        return np.asarray(loader(str(path)))


def read_image_file(path: Path, reader: ImageFileReader | None = None) -> np.ndarray:
    """Read one PNG/JPEG/DICOM/NIfTI file as a channel-first array (uint8 kept, else float32 in [0, 1])."""
    array = (reader or ImageFileReader())(Path(path))
    if array.ndim == 4 and array.shape[-1] == 1:  # a 2-D NIfTI/DICOM slice stored as (C, H, W, 1)
        array = array[..., 0]
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def _parse_labels(table: pd.DataFrame, csv_path: Path, class_names: Sequence[str] | None) -> tuple[np.ndarray, list[str], bool]:
    raw = table["label"].astype(str).str.strip()
    multilabel = raw.str.contains(MULTILABEL_SEPARATOR, regex=False).any()
    tokens = [[t.strip() for t in value.split(MULTILABEL_SEPARATOR) if t.strip()] for value in raw]
    names = list(class_names) if class_names is not None else sorted({t for row in tokens for t in row})
    lookup = {name: i for i, name in enumerate(names)}
    for row, labels in enumerate(tokens):
        unknown = [t for t in labels if t not in lookup]
        if unknown or not labels:
            raise ValueError(
                f"{csv_path}: row {row + 2} ({table['path'].iloc[row]}): label {raw.iloc[row]!r} is not in the class list {names}"
            )
    if multilabel:
        encoded = np.zeros((len(tokens), len(names)), dtype=np.int64)
        for row, labels in enumerate(tokens):
            encoded[row, [lookup[t] for t in labels]] = 1
        return encoded, names, True
    return np.array([lookup[row[0]] for row in tokens], dtype=np.int64), names, False


def read_image_table(labels_csv: str | Path, image_dir: str | Path | None = None, class_names: Sequence[str] | None = None) -> LabeledImages:
    """Read a ``path,label[,split]`` CSV; image paths are relative to ``image_dir`` (default: the CSV's folder).

    Raises:
        ValueError: missing columns, unknown labels or split names, missing files; unreadable files and
            mismatched sizes are reported by :meth:`LabeledImages.load`.
    """
    csv_path = Path(labels_csv)
    if not csv_path.is_file():
        raise ValueError(f"labels_csv {csv_path}: file not found")
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {missing}; expected columns path,label[,split], found {list(table.columns)}")
    if table.empty:
        raise ValueError(f"{csv_path}: no rows")
    root = Path(image_dir) if image_dir else csv_path.parent
    files = [root / p for p in table["path"]]
    absent = [(row + 2, str(f)) for row, f in enumerate(files) if not f.is_file()]
    if absent:
        raise ValueError(f"{csv_path}: {len(absent)} image(s) not found, first: row {absent[0][0]}: {absent[0][1]}")
    labels, names, multilabel = _parse_labels(table, csv_path, class_names)
    split = None
    if "split" in table.columns:
        split = table["split"].str.strip().str.lower().to_numpy()
        bad = [(row + 2, s) for row, s in enumerate(split) if s not in SPLITS]
        if bad:
            raise ValueError(f"{csv_path}: row {bad[0][0]}: split {bad[0][1]!r} is not one of {list(SPLITS)}")
    loader = ImageFileReader()
    try:
        first = read_image_file(files[0], loader)
    except Exception as error:
        raise ValueError(f"{csv_path}: row 2: cannot read image {files[0]}: {error}") from None

    def load(indices: np.ndarray, resize: Resize | None = None) -> np.ndarray:
        arrays = []
        reference = resized(first, resize)
        for i in indices:
            try:
                array = resized(read_image_file(files[i], loader), resize)
            except Exception as error:  # MONAI wraps reader errors in several types
                raise ValueError(f"{csv_path}: row {i + 2}: cannot read image {files[i]}: {error}") from None
            if array.shape[0] != reference.shape[0]:
                raise ValueError(
                    f"{csv_path}: row {i + 2}: image {files[i]} has {array.shape[0]} channel(s) but {files[0]} has "
                    f"{reference.shape[0]}; all images of a data set need the same channel count (gray or RGB)"
                )
            if array.shape != reference.shape:
                raise ValueError(
                    f"{csv_path}: row {i + 2}: image {files[i]} has size {array.shape[1:]} but {files[0]} has "
                    f"{reference.shape[1:]}; set --data.image_size to resize them to one size"
                )
            arrays.append(array.astype(np.float32) / 255.0 if array.dtype == np.uint8 and reference.dtype != np.uint8 else array)
        return np.stack(arrays)

    return LabeledImages(
        labels=labels,
        class_names=names,
        task="multilabel" if multilabel else infer_task(labels, len(names)),
        split=split,
        sample_shape=tuple(first.shape),
        load=load,
        names=[str(p) for p in table["path"]],
    )
