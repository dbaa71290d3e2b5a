"""Media: what a user may get wrong, each refused by the real runner with exit 2 before a run folder exists.

Every case writes tiny real files (PNG, JPEG, ``.npz``) and runs ``python -m pipelines.run media`` in
this process (``tests/bad_inputs.py``); the data module reads and checks every image when the runner
links the data to the model, so no case trains.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported at collection: its log handler must bind the session's stderr, not a closed capsys stream)
import numpy as np
import pytest
from PIL import Image

from tests.bad_inputs import BadInput, check_refused, params


def pngs(folder: Path, count: int = 6, mode: str = "L", size: int = 12, sub: str = "") -> None:
    rng = np.random.default_rng(0)
    (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / sub / f"{i}.png")


def npz(folder: Path, **arrays: np.ndarray) -> None:
    np.savez(folder / "set.npz", **arrays)


def images(n: int = 8, size: int = 8, dtype=np.float32, bad: tuple[int, float] | None = None) -> np.ndarray:
    x = np.random.default_rng(n).random((n, size, size)).astype(dtype)
    if bad is not None:
        x[bad[0], 1, 1] = bad[1]
    return x


def truncated(folder: Path) -> None:
    pngs(folder, 4)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)).save(folder / "cut.png")
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])


DIR = ("--data.image_dir", "{tmp}")
NPZ = ("--data.npz_path", "{tmp}/set.npz")
CASES = [
    BadInput("npz_nan", NPZ, ("set.npz", "'x_train'", "NaN", "item 3"), lambda f: npz(f, x_train=images(bad=(3, np.nan)))),
    BadInput("npz_inf_in_test_split", NPZ, ("'x_test'", "inf", "item 1"), lambda f: npz(f, x_train=images(), x_test=images(4, bad=(1, -np.inf)))),
    BadInput("npz_float32_overflow", NPZ, ("'images'", "float32's range", "item 0"), lambda f: npz(f, images=images(dtype=np.float64, bad=(0, 1e300)))),
    BadInput("npz_nan_in_val_split", NPZ, ("'val_images'", "NaN", "item 2"), lambda f: npz(f, train_images=images(), val_images=images(4, bad=(2, np.nan)), test_images=images(4))),
    BadInput("npz_values_out_of_range", NPZ, ("span [-5, 300]", "nothing is clipped"), lambda f: npz(f, x_train=np.broadcast_to(np.linspace(-5, 300, 64, dtype=np.float32).reshape(8, 8), (8, 8, 8)))),
    BadInput("npz_without_image_array", NPZ, ("no image array found", "npz_key"), lambda f: npz(f, labels=np.arange(8), weights=np.ones(3))),
    BadInput("npz_key_not_there", (*NPZ, "--data.npz_key=pixels"), ("no array 'pixels'",), lambda f: npz(f, x_train=images())),
    BadInput("npz_bool_images", NPZ, ("dtype bool", "expected uint8, uint16 or floats"), lambda f: npz(f, x_train=images() > 0.5)),
    BadInput("npz_five_dimensional", NPZ, ("(8, 2, 8, 8, 1)", "expected an (N,H,W[,C]) array"), lambda f: npz(f, x_train=np.zeros((8, 2, 8, 8, 1), np.uint8))),
    BadInput("npz_split_shapes_differ", NPZ, ("different shapes",), lambda f: npz(f, x_train=images(), x_test=images(4, size=10))),
    BadInput("npz_label_count_mismatch", NPZ, ("x_train has 8 images", "y_train has 5 labels"), lambda f: npz(f, x_train=images(), y_train=np.arange(5))),
    BadInput("npz_negative_labels", NPZ, ("non-negative",), lambda f: npz(f, x_train=images(), y_train=np.arange(8) - 1)),
    BadInput("npz_fractional_labels", NPZ, ("'y_train'", "0.5", "item 0", "not a whole number"), lambda f: npz(f, x_train=images(), y_train=np.arange(8) % 3 + 0.5)),
    BadInput("npz_sparse_codes_of_one_image", NPZ, ("'y_train'", "'1000' (1 image)", "fewer than 2 images"), lambda f: npz(f, x_train=images(), y_train=np.arange(8) * 1000)),
    BadInput("npz_labels_of_two_columns", NPZ, ("'y_train'", "shape (8, 2)", "one class code per image"), lambda f: npz(f, x_train=images(), y_train=np.zeros((8, 2), np.int64))),
    BadInput("npz_int64_pixels_past_255", NPZ, ("span [0, 76200]", "int64", "uint16 (0..65535"), lambda f: npz(f, x_train=np.linspace(0, 76200, 512).reshape(8, 8, 8).astype(np.int64))),
    BadInput("npz_empty_array", NPZ, ("is empty",), lambda f: npz(f, x_train=np.zeros((0, 8, 8), np.uint8))),
    BadInput("npz_not_an_npz", NPZ, ("not a readable .npz",), lambda f: (f / "set.npz").write_text("hello")),
    BadInput("empty_folder", DIR, ("no image files",), None),
    BadInput("folder_with_one_non_image_file", DIR, ("no image files",), lambda f: (f / "notes.txt").write_text("no images")),
    BadInput("corrupt_png", DIR, ("broken.png", "cannot read image"), lambda f: (pngs(f), (f / "broken.png").write_bytes(b"not a png"))),
    BadInput("truncated_png", DIR, ("cut.png", "unreadable or truncated"), truncated),
    BadInput("mixed_channels_with_fixed_count", (*DIR, "--data.channels=1"), ("0.png has 3 channel(s)", "channels=1"), lambda f: (pngs(f, 3), pngs(f, 1, "RGB", sub="."))),
    BadInput("loose_file_beside_class_folders", DIR, ("top level", "class sub-folder"), lambda f: (pngs(f, 3, sub="cats"), pngs(f, 1))),
    BadInput("class_folders_differ_by_case", DIR, ("'cat'", "'Cat'", "spelt two ways", "--data.class_names"), lambda f: (pngs(f, 4, sub="cat"), pngs(f, 3, sub="Cat"))),
    BadInput("class_folders_singular_and_plural", DIR, ("'cats' (4 images)", "'cat' (3 images)", "spelt two ways"), lambda f: (pngs(f, 4, sub="cats"), pngs(f, 3, sub="cat"), pngs(f, 3, sub="dog"))),
    BadInput("class_folder_of_one_image", DIR, ("'bird' (1 image)", "fewer than 2 images"), lambda f: (pngs(f, 4, sub="cat"), pngs(f, 4, sub="dog"), pngs(f, 1, sub="bird"))),
    BadInput("class_folder_typo_against_class_names", (*DIR, "--data.class_names=[cat,dog]"), ("'dgo'", "did you mean 'dog'", "--data.class_names"), lambda f: (pngs(f, 4, sub="cat"), pngs(f, 4, sub="dgo"))),
    BadInput("declared_class_without_folder", (*DIR, "--data.class_names=[cat,dog,bird]"), ("['bird']", "no sub-folder"), lambda f: (pngs(f, 4, sub="cat"), pngs(f, 4, sub="dog"))),
    BadInput("class_names_typo_on_the_built_in_set", ("--data.class_names=[circle,sqare,triangle]",), ("'sqare'", "did you mean 'square'", "built-in synthetic set"), lambda f: None),
    BadInput("class_names_repeated", (*DIR, "--data.class_names=[cat,cat]"), ("--data.class_names", "each class once"), lambda f: pngs(f, 4, sub="cat")),
    BadInput("npz_label_past_class_names", (*NPZ, "--data.class_names=[zero,one]"), ("label 2", "0..1", "--data.class_names"), lambda f: npz(f, x_train=images(), y_train=np.arange(8) % 3)),
    BadInput("too_few_images", DIR, ("split empty", "at least 3 images"), lambda f: pngs(f, 2)),
    BadInput("image_dir_is_a_file", ("--data.image_dir", "{tmp}/notes.txt"), ("not a folder",), lambda f: (f / "notes.txt").write_text("x")),
    BadInput("image_dir_and_npz_path", (*DIR, *NPZ), ("not both",), lambda f: npz(f, x_train=images())),
    BadInput("image_size_1", ("--data.image_size=1",), ("--data.image_size", "at least 8", "got 1"), None),
    BadInput("image_size_0", ("--data.image_size=0",), ("--data.image_size", "got 0"), None),
    BadInput("image_size_negative", ("--data.image_size=-16",), ("--data.image_size", "got -16"), None),
    BadInput("unknown_augmentation", ("--data.augment=[{HorizontalFlipp: {p: 0.5}}]",), ("HorizontalFlipp",), None),
    BadInput("generate_seed_past_int64", ("--data.generate_seed=18446744073709551615", "--data.num_generate=3"), ("--data.generate_seed", "18446744073709551615", "0..9223372036854775805"), None),
    BadInput("generate_seed_negative", ("--data.generate_seed=-1",), ("--data.generate_seed -1", "expected a whole number in 0.."), None),
    BadInput("diffusion_widths_not_divisible_by_head_channels", ("--model=domains.media.model.Diffusion", "--model.init_args.unet_widths=[16,16,16]", "--model.init_args.attention_levels=[false,false,false]",
             "--model.init_args.norm_num_groups=8", "--data.image_size=16"), ("--model.init_args.num_head_channels 32", "--model.init_args.unet_widths [16, 16, 16]", "try 16"), None),
    BadInput("generate_sampler_in_capitals", ("--data.generate_sampler=DDIM",), ("--data.generate_sampler DDIM", "expected one of ddim, ddpm", "did you mean 'ddim'"), None),
    BadInput("batch_size_0", ("--data.batch_size=0",), ("batch_size", "got 0"), None),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input_is_refused(case, tmp_path, capsys):
    message = " ".join(check_refused("media", replace(case, expect=()), tmp_path, capsys).split())
    for expected in case.expect:  # against the unwrapped paragraph: the runner wraps it at 100 columns
        assert expected.lower() in message.lower(), f"{expected!r} is not in the error message:\n{message}"


def test_declared_class_names_order_the_folders_and_allow_names_spelt_alike(tmp_path):
    """With --data.class_names the folders take the declared order, and names spelt alike are allowed when listed."""
    from domains.media.data import MediaDataModule

    pngs(tmp_path, 3, sub="cat")
    pngs(tmp_path, 4, sub="Cat")
    pngs(tmp_path, 5, sub="dog")
    data = MediaDataModule(image_dir=str(tmp_path), image_size=12, class_names=["dog", "cat", "Cat"])
    assert data.class_names == ["dog", "cat", "Cat"] and data.num_classes == 3
    counts = np.bincount(data.source.labels, minlength=3).tolist()
    assert counts == [5, 3, 4], counts


def test_hidden_folders_are_neither_images_nor_classes(tmp_path, capsys):
    """A Jupyter ``.ipynb_checkpoints`` folder beside the class folders is left out, and the log says so."""
    from domains.media.data import MediaDataModule

    pngs(tmp_path, 3, sub="cat")
    pngs(tmp_path, 3, sub="dog")
    pngs(tmp_path, 2, sub=".ipynb_checkpoints")
    pngs(tmp_path, 1, sub="dog/.thumbnails")
    data = MediaDataModule(image_dir=str(tmp_path), image_size=12)
    assert data.class_names == ["cat", "dog"] and len(data.source.pixels) == 6
    assert "3 image file(s) under hidden names" in capsys.readouterr().err


def test_npz_label_codes_are_classes_named_by_their_code(tmp_path):
    """Codes 0 and 1000 in an .npz are two classes named '0' and '1000' (not 1001 classes)."""
    from domains.media.data import MediaDataModule

    npz(tmp_path, x_train=images(), y_train=np.repeat([1000, 0], 4))
    data = MediaDataModule(npz_path=str(tmp_path / "set.npz"), image_size=8)
    assert data.class_names == ["0", "1000"] and data.num_classes == 2
    assert data.source.labels.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
