"""Media data: the embedded shapes set, image folders, ``.npz`` files and bad input, on real files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from domains.media.data import MediaDataModule
from domains.media.synthetic import make_shape_images
from tests.conftest import shared_file
from tests.helpers import shapes_module


def write_png(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


# ----- data ---------------------------------------------------------------------------------------
def test_synthetic_shapes_are_deterministic_per_item():
    images, labels = make_shape_images(12, size=16, seed=3)
    again, _ = make_shape_images(12, size=16, seed=3)
    other, _ = make_shape_images(12, size=16, seed=4)
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    assert images.shape == (12, 16, 16, 3) and set(labels.tolist()) <= {0, 1, 2}
    # a saturated shape stands out from the muted background in at least one colour channel
    assert (images.std(axis=(1, 2)).max(axis=1) > 20).all()


def test_folder_with_class_subfolders_resizes_and_mixes_gray_into_rgb(tmp_path):
    write_png(tmp_path / "cats" / "a.png", (20, 24), "RGB", 1)
    write_png(tmp_path / "cats" / "b.png", (40, 40), "L", 2)
    (tmp_path / "dogs").mkdir()
    for i in range(4):
        rgb = np.random.default_rng(i).integers(0, 256, (30, 30, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / "dogs" / f"{i}.jpg", quality=90)
    dm = MediaDataModule(image_dir=str(tmp_path), image_size=16, batch_size=4)
    assert dm.class_names == ["cats", "dogs"] and dm.num_classes == 2 and dm.in_channels == 3
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[1:] == (3, 16, 16) and batch["image"].min() >= -1 and batch["image"].max() <= 1
    gray = MediaDataModule(image_dir=str(tmp_path / "cats"), image_size=16, channels=None)
    assert gray.num_classes == 0 and gray.in_channels == 3  # one RGB file: everything becomes RGB


def test_flat_gray_folder_is_unlabelled_single_channel(tmp_path):
    for i in range(5):
        write_png(tmp_path / f"{i}.png", (16, 16), "L", i)
    dm = MediaDataModule(image_dir=str(tmp_path), image_size=16)
    assert (dm.in_channels, dm.num_classes) == (1, 0)
    dm.setup()
    assert next(iter(dm.train_dataloader()))["label"].eq(-1).all()


def test_mnist_style_npz_keeps_its_split(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), y_train=np.arange(30) % 3,
             x_test=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), y_test=np.arange(10) % 3)  # fmt: skip
    dm = MediaDataModule(npz_path=str(path), image_size=16)
    assert (dm.in_channels, dm.num_classes) == (1, 3)
    assert {k: len(v) for k, v in dm.split_indices.items()} == {"train": 30, "val": 5, "test": 5}
    assert dm.source.pixels.shape == (40, 16, 16, 1)


def test_medmnist_style_npz_keeps_its_official_splits(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{split}_images": rng.integers(0, 256, (n, 16, 16), dtype=np.uint8) for split, n in (("train", 20), ("val", 6), ("test", 8))}
    arrays.update({f"{split}_labels": (np.arange(n) % 2).reshape(n, 1) for split, n in (("train", 20), ("val", 6), ("test", 8))})
    np.savez(tmp_path / "med.npz", **arrays)
    dm = MediaDataModule(npz_path=str(tmp_path / "med.npz"), image_size=16)
    assert {k: len(v) for k, v in dm.split_indices.items()} == {"train": 20, "val": 6, "test": 8}
    assert np.array_equal(dm.source.pixels[dm.split_indices["val"], ..., 0], arrays["val_images"])
    assert dm.num_classes == 2


def test_16_bit_png_is_scaled_by_bit_depth_not_clipped(tmp_path):
    """PIL's convert("L") clips 16-bit values to 255 (a mid-grey gradient read as white): the bit-depth
    rule of pipelines/images.py reads value / 65535, the same picture as 8 bits within one level."""
    gradient = np.tile(np.linspace(0, 65535, 32), (32, 1)).astype(np.uint16)
    folder = tmp_path / "sixteen"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.roll(gradient, 8 * i, axis=1)).save(folder / f"g{i}.png")
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(folder / "black.png")
    dm = MediaDataModule(image_dir=str(folder), image_size=32)
    pixels = dict(zip([Path(n).name for n in dm.source.names], dm.source.pixels))
    assert dm.in_channels == 1 and abs(float(pixels["g0.png"].mean()) - 127.5) < 1
    assert pixels["black.png"].max() == 0  # a constant 16-bit image is a valid (black) picture, not clipped to white
    eight = np.rint(gradient / 257.0).astype(np.uint8)
    assert np.abs(pixels["g0.png"][..., 0].astype(int) - eight).max() <= 1
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 9).save(folder / "colour.png")
    rgb = MediaDataModule(image_dir=str(folder), image_size=32)
    assert rgb.in_channels == 3
    g0 = dict(zip([Path(n).name for n in rgb.source.names], rgb.source.pixels))["g0.png"]
    assert np.array_equal(g0[..., 0], g0[..., 2]) and abs(float(g0.mean()) - 127.5) < 1


def test_real_mnist_npz():
    path = shared_file("media/mnist.npz")
    dm = MediaDataModule(npz_path=str(path), image_size=28, max_train_images=500, max_eval_images=100)
    assert (dm.in_channels, dm.num_classes, dm.image_size) == (1, 10, 28)
    assert len(dm.split_indices["train"]) == 500 and len(dm.source.pixels) == 70000


# ----- bad input ------------------------------------------------------------------------------------
def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no image files .* found"):
        MediaDataModule(image_dir=str(tmp_path)).in_channels


def test_unreadable_image_is_named(tmp_path):
    write_png(tmp_path / "good.png", (16, 16))
    (tmp_path / "broken.png").write_bytes(b"this is not a png at all")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        MediaDataModule(image_dir=str(tmp_path)).in_channels


def test_truncated_image_is_named(tmp_path):
    write_png(tmp_path / "good.png", (16, 16))
    full = write_png(tmp_path / "cut.png", (64, 64), seed=5).read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=r"cut\.png \(unreadable or truncated\)"):
        MediaDataModule(image_dir=str(tmp_path), image_size=16).in_channels


def test_mixed_channels_with_a_fixed_count_name_the_file(tmp_path):
    write_png(tmp_path / "gray.png", (16, 16), "L")
    write_png(tmp_path / "colour.png", (16, 16), "RGB")
    with pytest.raises(ValueError, match=r"colour\.png has 3 channel\(s\) but channels=1"):
        MediaDataModule(image_dir=str(tmp_path), channels=1).in_channels


def test_npz_without_an_image_array(tmp_path):
    path = tmp_path / "table.npz"
    np.savez(path, labels=np.arange(10), weights=np.ones(3))
    with pytest.raises(ValueError, match=r"table\.npz: no image array found"):
        MediaDataModule(npz_path=str(path)).in_channels
    with pytest.raises(ValueError, match=r"no array 'pixels'"):
        MediaDataModule(npz_path=str(path), npz_key="pixels").in_channels



def test_unknown_augmentation_is_an_error():
    with pytest.raises(ValueError, match="no transform 'Sparkle'"):
        shapes_module(augment=[{"Sparkle": {"p": 1.0}}])
    with pytest.raises(ValueError, match="invalid arguments for HorizontalFlip"):  # a misspelt argument is not ignored
        shapes_module(augment=[{"HorizontalFlip": {"probability": 0.5}}])

