"""Read image sets for the media domain: a folder of PNG/JPEG files, an ``.npz`` array, or the synthetic set.

Every reader returns an :class:`ImageSet`: uint8 pixels ``(N, H, W, C)`` at one size and channel
count, integer labels (or ``None``), class names and, when the source has one, an official split.
Problems are ``ValueError`` s that name the file and what was expected.

Example:
    >>> data = synthetic_images(12, size=16, seed=0)
    >>> data.pixels.shape, data.class_names
    ((12, 16, 16, 3), ['circle', 'square', 'triangle'])
"""

from __future__ import annotations

from dataclasses import dataclass
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from domains.media.synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
from domains.media.synthetic import make_shape_images
from pipelines.errors import InputError
from pipelines.images import GRAY_MODES, check_finite_pixels, open_npz, read_pil, scale_integers, to_uint8
from pipelines.validation import check_labels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: keys tried, in order, for the image array of an ``.npz`` when ``npz_key`` is not given
NPZ_IMAGE_KEYS = ("x_train", "images", "train_images", "x", "X", "imgs", "data", "arr_0")
#: the held-out arrays looked for beside a training array (``x_train`` -> ``x_val``, ``x_test``)
HELD_OUT = (("val", ("val", "valid", "validation")), ("test", ("test",)))


@dataclass
class ImageSet:
    """Pixels ``(N, H, W, C)`` uint8, labels ``(N,)`` int64 or ``None``, names per item, optional split."""

    pixels: np.ndarray
    labels: np.ndarray | None
    class_names: list[str]
    names: list[str]
    split: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[-1])


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop to ``size x size`` (PIL, bicubic)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    from PIL import Image, ImageOps

    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(ImageOps.fit(pil, (size, size), Image.Resampling.BICUBIC))
    return out[..., None] if out.ndim == 2 else out


def _to_uint8(array: np.ndarray, source: str) -> np.ndarray:
    """uint8 kept; uint16 by bit depth (``v / 65535``, :mod:`pipelines.images`); floats in [0, 1] or [0, 255]."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return to_uint8(scale_integers(array, 16))
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{source}: image array has dtype {array.dtype}; expected uint8, uint16 or floats")
    check_finite_pixels(array, source)
    values = array.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1.0:
        values = values * 255.0
    elif low < 0 or high > 255:
        sixteen = "; 16-bit images are read as uint16 (0..65535, scaled by bit depth)" if np.issubdtype(array.dtype, np.integer) else ""
        raise InputError(f"{source}: pixel values span [{low:g}, {high:g}] ({array.dtype}); expected [0, 1] floats or [0, 255]{sixteen} (nothing is clipped)")
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _channels_last(images: np.ndarray, source: str) -> np.ndarray:
    if images.ndim == 3:  # (N, H, W) gray
        return images[..., None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):  # (N, H, W, C)
        return images
    if images.ndim == 4 and images.shape[1] in (1, 3):  # (N, C, H, W)
        return np.moveaxis(images, 1, -1)
    raise InputError(f"{source}: images have shape {images.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W) with C = 1 or 3")


def match_channels(pixels: np.ndarray, channels: int | None, source: str) -> np.ndarray:
    """Gray -> RGB when 3 channels are wanted; a fixed count that does not match is an error."""
    have = pixels.shape[-1]
    if channels is None or channels == have:
        return pixels
    raise InputError(f"{source}: images have {have} channel(s) but channels={channels} is configured; set --data.channels to {have} or null (convert automatically)")


def _class_codes(labels: np.ndarray, source: str) -> np.ndarray:
    """One label array as int64 class codes. Labels are codes, never measurements: a value that is not a
    whole number >= 0 (``0.5``, NaN, ``-1``) is refused naming its item, since truncating it would train
    on a class the file does not give."""
    if labels.ndim > 1 and int(np.prod(labels.shape[1:])) != 1:  # (40, 2) was counted as 80 labels
        raise InputError(f"{source}: labels have shape {labels.shape}; expected one class code per image, shape (N,) or (N, 1)")
    labels = labels.reshape(-1)
    if labels.dtype == np.bool_ or np.issubdtype(labels.dtype, np.integer):
        codes = labels.astype(np.int64)
    elif np.issubdtype(labels.dtype, np.floating):
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not whole.all():
            item = int(np.argmin(whole))
            raise InputError(
                f"{source}: label {float(labels[item])!r} (item {item}) is not a whole number; labels are class codes "
                "(0, 1, 2, ...) and nothing is rounded or truncated: store the class of each image as a whole number"
            )
        codes = labels.astype(np.int64)
    else:
        raise InputError(f"{source}: labels have dtype {labels.dtype}; expected whole numbers, the class code of each image (0, 1, 2, ...)")
    if len(codes) and codes.min() < 0:
        item = int(np.argmax(codes < 0))
        raise InputError(f"{source}: label {int(codes[item])} (item {item}); labels must be non-negative integers, the class code of each image (0, 1, 2, ...)")
    return codes


def _codes_as_classes(codes: np.ndarray, where: str) -> tuple[np.ndarray, list[str]]:
    """Class codes -> ``(labels 0..K-1, class names)``: each distinct code is one class, named by the code
    (codes 0, 1000, ... are 2 classes ``'0'``, ``'1000'``, not 1001). The classes go through the folder
    rule (:func:`pipelines.validation.check_labels`: a class of one image is refused, same words)."""
    values, counts = np.unique(codes, return_counts=True)
    names = [str(int(value)) for value in values]
    check_labels(dict(zip(names, counts.tolist())), where, min_rows=2, unit="image")
    if not np.array_equal(values, np.arange(len(values))):
        print(f"[media] {where}: {len(values)} distinct codes {names[0]}..{names[-1]} taken as {len(values)} classes named by their code", file=sys.stderr)
    return np.searchsorted(values, codes).astype(np.int64), names


def _image_array(npz: np.lib.npyio.NpzFile, path: Path, key: str | None) -> tuple[str, np.ndarray]:
    if key is not None:
        if key not in npz.files:
            raise InputError(f"{path}: no array {key!r} (npz_key); the file holds {sorted(npz.files)}")
        return key, npz[key]
    for candidate in NPZ_IMAGE_KEYS:
        if candidate in npz.files:
            array = npz[candidate]
            if array.ndim in (3, 4):
                return candidate, array
    described = {name: tuple(npz[name].shape) for name in npz.files}
    raise InputError(
        f"{path}: no image array found; expected an (N,H,W[,C]) array under one of {list(NPZ_IMAGE_KEYS)} "
        f"or named by --data.npz_key, found {described}"
    )


def read_npz(
    path: str | Path, image_size: int, channels: int | None, key: str | None = None, use_labels: bool = True, class_names: Sequence[str] | None = None
) -> ImageSet:
    """Read an ``.npz`` with an image array; official splits are kept: MNIST's ``x_train, y_train, x_test,
    y_test`` (``x_val`` too when present) and MedMNIST's ``train_images``, ``val_images``, ``test_images``.

    Labels come from ``y_*`` / ``labels`` beside the images when present and ``use_labels`` is set;
    they are class indices, named by ``class_names`` when given (a label past its end is refused),
    else ``"0"``, ``"1"``, ...
    """
    path = Path(path)
    with open_npz(path) as npz:
        image_key, first = _image_array(npz, path, key)
        parts: list[tuple[str, np.ndarray, np.ndarray | None]] = []
        pairs = [(image_key, "train")]
        label_keys: list[str | None] = []
        if "train" in image_key:  # official held-out arrays: x_train -> x_val, x_test; train_images -> val_images, test_images
            for split, words in HELD_OUT:
                found = next((image_key.replace("train", w) for w in words if image_key.replace("train", w) in npz.files), None)
                if found is not None:
                    pairs.append((found, split))
        for name, split in pairs:
            images = npz[name]
            label_key = next((k for k in (name.replace("x_", "y_").replace("images", "labels"), "labels", "y") if k != name and k in npz.files), None)
            labels = _class_codes(npz[label_key], f"{path}: array {label_key!r}") if (use_labels and label_key) else None
            if labels is not None and len(labels) != len(images):
                raise InputError(f"{path}: {name} has {len(images)} images but {label_key} has {len(labels)} labels")
            parts.append((split, _channels_last(images, f"{path}:{name}"), labels))
            label_keys.append(label_key)
    shapes = {images.shape[1:] for _, images, _ in parts}
    if len(shapes) > 1:
        raise InputError(f"{path}: the split arrays {[name for name, _ in pairs]} hold images of different shapes {sorted(shapes)}")
    if any(len(images) == 0 for _, images, _ in parts):
        raise InputError(f"{path}: the image array {image_key!r} is empty")
    pixels = np.concatenate([_to_uint8(images, f"{path}: array {name!r}") for (name, _), (_, images, _) in zip(pairs, parts)])
    pixels = match_channels(pixels, channels, str(path))
    if pixels.shape[1] != image_size or pixels.shape[2] != image_size:
        pixels = np.stack([resize_square(image, image_size) for image in pixels])
    label_parts = [labels for _, _, labels in parts]
    labels = None
    if all(part is not None for part in label_parts):
        labels = np.concatenate(label_parts)
        if class_names is not None and labels.max() >= len(class_names):
            item = int(np.argmax(labels >= len(class_names)))
            raise InputError(
                f"{path}: label {int(labels[item])} (item {item}) has no name: --data.class_names lists {len(class_names)} "
                f"classes {list(class_names)}, so labels must be 0..{len(class_names) - 1}"
            )
    split = np.concatenate([np.full(len(images), split) for split, images, _ in parts]) if len(parts) > 1 else None
    names = [f"{path.name}:{i}" for i in range(len(pixels))]
    if labels is None:
        class_names = []
    elif class_names is not None:
        class_names = [str(c) for c in class_names]
    else:
        label_keys = sorted({key for key in label_keys if key is not None})
        labels, class_names = _codes_as_classes(labels, f"{path}: labels {', '.join(map(repr, label_keys))}")
    return ImageSet(pixels=pixels, labels=labels, class_names=class_names, names=names, split=split)


def list_image_folder(folder: str | Path, class_names: Sequence[str] | None = None, labelled: bool = True) -> tuple[list[Path], np.ndarray | None, list[str]]:
    """Image files under ``folder``; images in sub-folders take the sub-folder name as class label.

    Returns ``(files, labels or None, class_names)``. Labels are used only when every image sits in a
    sub-folder (images mixed at the top level and in sub-folders are an error). The folder names go
    through :func:`pipelines.validation.check_labels`: without ``class_names``, two names spelt alike
    (``Cat`` / ``cat``, ``cats`` / ``cat``) or a class of one image are refused; with it, a folder
    that is not a declared class is refused with the closest declared name, a declared class without
    a folder is refused, and the classes take the declared order. ``labelled=False``: the folders
    are not classes (no labels, nothing checked).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image_dir {folder}: not a folder")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    # hidden files and folders (.ipynb_checkpoints, ._x.png from macOS) are not images of the set, nor classes
    files = [p for p in found if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if len(files) < len(found):
        print(f"[media] image_dir {folder}: {len(found) - len(files)} image file(s) under hidden names (starting with '.') left out", file=sys.stderr)
    if not files:
        raise InputError(f"image_dir {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found, the folder is empty of images")
    tops = [p.relative_to(folder).parts for p in files]
    in_sub = [len(parts) > 1 for parts in tops]
    if not any(in_sub):
        return files, None, []
    if not all(in_sub):
        loose = next(p for p, sub in zip(files, in_sub) if not sub)
        raise InputError(
            f"image_dir {folder}: {loose.name} lies at the top level while other images are in class sub-folders; "
            "put every image in a class sub-folder, or none"
        )
    if not labelled:
        return files, None, []
    counts = Counter(parts[0] for parts in tops)
    where = f"image_dir {folder}: class sub-folders"
    check_labels(counts, where, declared=list(class_names) if class_names is not None else None, min_rows=2, unit="image")
    if class_names is not None:
        empty = [name for name in class_names if name not in counts]
        if empty:
            raise InputError(f"{where}: declared class(es) {empty} (--data.class_names) have no sub-folder of images; found {sorted(counts)}")
    names = list(class_names) if class_names is not None else sorted(counts)
    lookup = {name: i for i, name in enumerate(names)}
    return files, np.array([lookup[parts[0]] for parts in tops], dtype=np.int64), names


def probe_channels(path: Path) -> int:
    """Channel count of an image file from its header (1 for gray modes, else 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return 1 if image.mode in GRAY_MODES else 3
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(f"cannot read image {path}: {error}") from None


def read_image_file(path: Path, image_size: int, channels: int) -> np.ndarray:
    """Decode one PNG/JPEG fully (truncated files fail here), as ``(size, size, channels)`` uint8.

    Values follow :mod:`pipelines.images`' bit-depth rule (a 16-bit ``v`` is ``v / 65535``, then
    quantised to 8 bits), so a 16-bit file is never clipped the way PIL's ``convert("L")`` clips it.
    """
    from PIL import Image

    hwc = np.moveaxis(to_uint8(read_pil(path)), 0, -1)
    if hwc.shape[-1] != channels:
        if channels == 3:
            hwc = np.repeat(hwc, 3, axis=-1)
        else:  # RGB -> gray with PIL's ITU-R 601-2 luma, as convert("L") computes it
            hwc = np.asarray(Image.fromarray(np.ascontiguousarray(hwc)).convert("L"))[..., None]
    return resize_square(np.ascontiguousarray(hwc), image_size)


def read_image_folder(
    folder: str | Path, image_size: int, channels: int | None, use_labels: bool = True, class_names: Sequence[str] | None = None
) -> ImageSet:
    """Read every PNG/JPEG under ``folder`` at ``image_size`` (class sub-folders: :func:`list_image_folder`).

    ``channels=None`` reads gray files as gray when all are gray, and everything as RGB otherwise;
    a fixed ``channels`` makes any file with another count an error that names it.
    """
    files, labels, class_names = list_image_folder(folder, class_names, labelled=use_labels)
    counts = [probe_channels(p) for p in files]
    if channels is None:
        wanted = 1 if all(c == 1 for c in counts) else 3
    else:
        wanted = channels
        for path, count in zip(files, counts):
            if count != channels:
                raise InputError(
                    f"image_dir {folder}: {path} has {count} channel(s) but channels={channels} is configured "
                    "(mixed channel counts); convert the file or set --data.channels null to convert automatically"
                )
    pixels = np.stack([read_image_file(p, image_size, wanted) for p in files])
    if not use_labels:
        labels, class_names = None, []
    return ImageSet(pixels=pixels, labels=labels, class_names=class_names, names=[str(p) for p in files])


def synthetic_images(count: int, size: int, seed: int, channels: int | None = None) -> ImageSet:
    """The embedded shapes set (RGB; ``channels=1`` converts it to gray)."""
    pixels, labels = make_shape_images(count, size, seed)
    if channels == 1:
        pixels = np.rint(pixels @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
    return ImageSet(pixels=pixels, labels=labels, class_names=list(SYNTHETIC_CLASSES), names=[f"synthetic/{i}" for i in range(count)])
