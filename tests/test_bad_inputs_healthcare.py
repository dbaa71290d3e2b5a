"""Healthcare: what a user may get wrong, each refused by the real runner with exit 2 before a run folder exists.

Every case writes tiny real files (PNG, 16-bit PNG, DICOM, NIfTI, ``.npz``, CSV) and runs
``python -m pipelines.run healthcare`` in this process (``tests/bad_inputs.py``). The last test
takes the domain's tiny run (trained once per session, tests/conftest.py) and checks that
``predict`` with a bad file in ``--data.predict_dir`` leaves the run folder as it was.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported at collection: its log handler must bind the session's stderr, not a closed capsys stream)
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.bad_inputs import BadInput, check_refused, folder_digests, params
from tests.conftest import copy_run, run_pipeline
from tests.medical_files import blob_images, write_dicom, write_nifti, write_png


def table(folder: Path, labels: list[str] | None = None, splits: list[str] | None = None, count: int = 8, size: int = 8, **override) -> Path:
    """``count`` gray PNGs (benign/malignant blobs) and ``labels.csv``; ``override`` maps a row index to a writer."""
    images, classes = blob_images(count, size)
    rows = []
    for i, image in enumerate(images):
        path = folder / f"case{i}.png"
        override.get(f"r{i}", write_png)(path, image)
        rows.append({"path": path.name, "label": labels[i] if labels else ("benign", "malignant")[classes[i]], "split": (splits or ["train", "train", "val", "test"] * (count // 4 + 1))[i]})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


def medmnist(folder: Path, bad: str | None = None, value: float = np.nan, dtype=np.float32) -> Path:
    arrays = {}
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = np.random.default_rng(0).random((n, 8, 8)).astype(dtype)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    if bad:
        key, item = bad.split("@")
        arrays[key][int(item), 2, 3] = value
    np.savez(folder / "set.npz", **arrays)
    return folder / "set.npz"


def duplicate_row(folder: Path, index: int) -> None:
    """The labels table with data row 6 pointing at the image of data row ``index + 1``."""
    csv = table(folder)
    frame = pd.read_csv(csv)
    frame.loc[5, "path"] = frame.loc[index, "path"]
    frame.to_csv(csv, index=False)


def set_path(csv: Path, index: int, path: str) -> None:
    frame = pd.read_csv(csv)
    frame.loc[index, "path"] = path
    frame.to_csv(csv, index=False)


def path_outside(folder: Path) -> None:
    """Data row 4 names an image that exists, but beside the CSV's folder (``../outside/x.png``)."""
    csv = table(folder)
    (folder.parent / "outside").mkdir()
    (folder / "case3.png").rename(folder.parent / "outside" / "x.png")
    set_path(csv, 3, "../outside/x.png")


def corrupt(path: Path, image: np.ndarray) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not a real PNG")


def png16(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image.astype(np.uint16) * 257).save(path)


def png12(path: Path, image: np.ndarray) -> None:
    """12-bit scanner data in a 16-bit PNG: values up to 16 x 220 = 3520, read as v / 65535 (about 16 times darker)."""
    from PIL import Image

    Image.fromarray(image.astype(np.uint16) * 16).save(path)


def ct_dicom(path: Path, image: np.ndarray) -> None:
    write_dicom(path, image.astype(np.uint16) * 16)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.RescaleIntercept, ds.RescaleSlope, ds.BitsStored, ds.HighBit = -1024, 1, 12, 11
    ds.save_as(path)


def csv_file(text: str):
    return lambda folder: (folder / "labels.csv").write_text(text)


def volume_among_images(folder: Path) -> None:
    table(folder)
    write_nifti(folder / "case2.nii.gz", np.random.default_rng(0).random((8, 8, 8)))
    rename(folder, "case2.png", "case2.nii.gz")


def rename(folder: Path, old: str, new: str) -> None:
    frame = pd.read_csv(folder / "labels.csv")
    frame["path"] = frame["path"].replace(old, new)
    frame.to_csv(folder / "labels.csv", index=False)
    (folder / old).unlink(missing_ok=True)


def ct_table_with_png(folder: Path, png: int = 5) -> None:
    """CT DICOMs in Hounsfield units but one 8-bit PNG (row ``png + 1``): one LOW HIGH cannot map both kinds (trial finding)."""
    table(folder, **{f"r{i}": (lambda p, a: ct_dicom(p.with_suffix(".dcm"), a)) for i in range(8) if i != png})
    for i in set(range(8)) - {png}:
        rename(folder, f"case{i}.png", f"case{i}.dcm")


def nifti_table(folder: Path, bad: int | None = None, scale: float = 1.0) -> None:
    rows = []
    for i in range(8):
        volume = np.random.default_rng(i).random((8, 8, 8)) * scale
        if i == bad:
            volume[1, 2, 3] = np.nan
        write_nifti(folder / f"vol{i}.nii.gz", volume)
        rows.append({"path": f"vol{i}.nii.gz", "label": "ab"[i % 2], "split": ("train", "val", "test", "train")[i % 4]})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)


CSV = ("--data.labels_csv", "{tmp}/labels.csv")
NPZ = ("--data.npz_path", "{tmp}/set.npz")
CASES = [
    # non-finite pixels: named by file, split array and item
    BadInput("npz_nan", NPZ, ("set.npz", "'train_images'", "NaN", "item 5"), lambda f: medmnist(f, "train_images@5")),
    BadInput("npz_inf_in_test", NPZ, ("'test_images'", "inf", "item 2"), lambda f: medmnist(f, "test_images@2", np.inf)),
    BadInput("npz_float32_overflow", NPZ, ("'val_images'", "float32's range", "item 1"), lambda f: medmnist(f, "val_images@1", 1e39, np.float64)),
    BadInput("npz_floats_outside_unit_range", NPZ, ("'train_images'", "span [0", "1000]"), lambda f: medmnist(f, "train_images@0", 1000.0)),
    BadInput("npz_without_medmnist_keys", NPZ, ("missing key(s)", "train_images"), lambda f: np.savez(f / "set.npz", images=np.zeros((4, 8, 8)), labels=np.zeros(4))),
    BadInput("nifti_nan", (*CSV, "--data.positive_class=b"), ("vol1.nii.gz", "row 2", "NaN"), lambda f: nifti_table(f, bad=1)),
    BadInput("nifti_floats_outside_unit_range", (*CSV, "--data.positive_class=b"), ("vol0.nii.gz", "span", "--data.intensity_range"), lambda f: nifti_table(f, scale=1000)),
    # labels
    BadInput("label_typo", CSV, ("'COVID-19'", "'covid'", "spelt two ways", "--data.class_names", "'covid' first at row 7"), lambda f: table(f, ["COVID-19", "normal"] * 3 + ["covid", "normal"])),
    BadInput("rare_class", CSV, ("'cyst' (1 row)", "fewer than 2 rows", "--data.class_names", "'cyst' first at row 7"), lambda f: table(f, ["benign", "malignant"] * 3 + ["cyst", "benign"])),
    BadInput("label_outside_class_names", (*CSV, "--data.class_names=[benign,malignant]"), ("'malignent'", "did you mean 'malignant'", "row 8"), lambda f: table(f, ["benign", "malignant"] * 3 + ["benign", "malignent"])),
    BadInput("empty_label", CSV, ("row 3 (case2.png)", "empty label"), lambda f: table(f, ["benign", "malignant", ""] + ["benign", "malignant"] * 2 + ["benign"])),
    BadInput("empty_csv", CSV, ("labels.csv", "the file is empty", "'path,label[,split]'"), lambda f: (f / "labels.csv").write_text("\n")),
    BadInput("binary_without_a_positive_class", CSV, ("['covid', 'flu']", "--data.positive_class"), lambda f: table(f, ["covid", "flu"] * 4)),
    BadInput("positive_class_not_a_class", (*CSV, "--data.positive_class=malignent"), ("'malignent'", "did you mean 'malignant'"), table),
    BadInput("positive_class_for_multiclass", (*CSV, "--data.positive_class=b"), ("for binary tasks", "multiclass"), lambda f: table(f, ["a", "b", "c", "a", "b", "c", "a", "b"], count=8)),
    BadInput("class_names_twice", (*CSV, "--data.class_names=[benign,benign]"), ("lists a class twice",), table),
    # files and table
    BadInput("image_listed_twice", CSV, ("row 6", "listed again", "first at row 2", "case1.png"), lambda f: duplicate_row(f, 1)),
    BadInput("missing_image", CSV, ("not found", "row 4", "case3.png"), lambda f: (table(f), (f / "case3.png").unlink())),
    BadInput("corrupt_png", CSV, ("row 3", "cannot read image", "case2.png"), lambda f: table(f, r2=corrupt)),
    BadInput("csv_without_path_label", CSV, ("missing column(s) ['path', 'label']", "found ['file', 'diagnosis']"), csv_file("file,diagnosis\na.png,x\n")),
    BadInput("path_outside_the_image_folder", CSV, ("row 4", "'../outside/x.png'", "points outside the image folder", "--data.image_dir"), path_outside),
    BadInput("absolute_path_elsewhere", CSV, ("row 3", "'/etc/passwd'", "points outside"), lambda f: set_path(table(f), 2, "/etc/passwd")),
    BadInput("semicolon_separated_csv", CSV, ("labels.csv", "looks ';'-separated"), lambda f: pd.read_csv(table(f)).to_csv(f / "labels.csv", index=False, sep=";")),
    BadInput("latin_1_label", CSV, ("labels.csv", "data row 2", "column 'label'", "not utf-8"),
             lambda f: (f / "labels.csv").write_bytes(pd.read_csv(table(f)).assign(label=["benign", "maliné"] * 4).to_csv(index=False).encode("latin-1"))),  # fmt: skip
    BadInput("csv_header_twice", CSV, ("column 'label' 2 times",), csv_file("path,label,label\na.png,x,y\n")),
    BadInput("empty_split", CSV, ("split 'val' is empty",), lambda f: table(f, splits=["train", "test"] * 4)),
    BadInput("unknown_split_name", CSV, ("row 1", "split 'training'"), lambda f: table(f, splits=["training"] + ["train", "val", "test"] * 3)),
    BadInput("mixed_sizes_without_image_size", CSV, ("row 2", "size (12, 12)", "--data.image_size"), lambda f: table(f, r1=lambda p, a: write_png(p, np.resize(a, (12, 12))))),
    BadInput("mixed_channels", CSV, ("row 4", "3 channel(s) (PNG mode 'RGB': RGB)", "1 (PNG mode 'L': gray)", "same channel count"), lambda f: table(f, r3=lambda p, a: write_png(p, np.stack([a] * 3, -1)))),
    # a palette PNG looks gray in a viewer; it is read as RGB, and the refusal says why
    BadInput("palette_png_among_gray", CSV, ("row 4", "3 channel(s) (PNG mode 'P': a palette image)"), lambda f: table(f, r3=lambda p, a: Image.fromarray(a.astype(np.uint8)).convert("P").save(p))),
    BadInput("volume_among_images", CSV, ("row 3", "3-D volume", "2-D image"), volume_among_images),
    BadInput("blank_16bit_png", CSV, ("row 5", "case4.png", "blank image"), lambda f: table(f, r4=lambda p, a: png16(p, np.zeros_like(a)))),
    # 12-bit values in 16-bit files among files that use their whole depth: trained about 16 times darker in silence
    BadInput("twelve_bit_among_8_bit", CSV, ("labels.csv", "12 bits or fewer", "row 3", "case2.png (16-bit, max", "row 6", "case5.png (16-bit, max 3520)",
                                             "row 1", "case0.png (8-bit, max", "row 2", "case1.png (8-bit, max 220)", "16 times darker", "split the table"),
             lambda f: table(f, r2=png12, r5=png12)),  # fmt: skip
    BadInput("ct_dicom_in_hounsfield_units", CSV, ("case1.dcm", "RescaleIntercept -1024", "--data.intensity_range"), lambda f: (table(f, r1=lambda p, a: ct_dicom(p.with_suffix(".dcm"), a)), rename(f, "case1.png", "case1.dcm"))),
    BadInput("dicom_window_without_window", (*CSV, "--data.intensity=dicom_window"), ("WindowCenter",), lambda f: (table(f, r0=lambda p, a: write_dicom(p.with_suffix(".dcm"), a)), rename(f, "case0.png", "case0.dcm"))),
    BadInput("hounsfield_range_on_a_png_among_ct_dicoms", (*CSV, "--data.intensity_range=[-1024,3071]"),
             ("row 6", "case5.png stores pixel codes (PNG)", "case0.dcm (row 1) stores physical units (DICOM RescaleSlope 1, RescaleIntercept -1024)"), ct_table_with_png),
    BadInput("intensity_range_reversed", (*CSV, "--data.intensity_range=[3071,-1024]"), ("LOW < HIGH",), table),
    # options
    BadInput("image_size_1", (*NPZ, "--data.image_size=1"), ("(1, 1, 1)", "at least 8 pixels", "--data.image_size"), medmnist),
    BadInput("image_size_0", (*NPZ, "--data.image_size=0"), ("--data.image_size", "positive", "got 0"), medmnist),
    BadInput("image_size_negative", (*NPZ, "--data.image_size=-4"), ("--data.image_size", "got -4"), medmnist),
    BadInput("native_size_too_small_for_densenet", (*NPZ, "--model.network=densenet121", "--model.width=1"), ("'densenet121'", "(1, 8, 8)", "at least 32"), medmnist),
    BadInput("unknown_augmentation", (*NPZ, "--data.augment=[{HorizontalFlipp: {p: 0.5}}]"), ("HorizontalFlipp",), medmnist),
]



@pytest.mark.parametrize("case", params(CASES))
def test_bad_input_is_refused(case, tmp_path, capsys):
    message = " ".join(check_refused("healthcare", replace(case, expect=()), tmp_path, capsys).split())
    for expected in case.expect:  # against the unwrapped paragraph: the runner wraps it at 100 columns
        assert expected.lower() in message.lower(), f"{expected!r} is not in the error message:\n{message}"


def test_dark_16_bit_images_among_16_bit_images_train_with_a_warning(tmp_path):
    """Among 16-bit files alone, one whose values stay at or below 4095 may be an underexposed image, not 12-bit data
    (a new-user trial's dark 16-bit images were refused): it trains, and a warning names it and a whole-depth file."""
    import warnings

    table(tmp_path, **{f"r{i}": png16 for i in range(8) if i != 3}, r3=png12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_pipeline("healthcare", "fit", "--data.labels_csv", str(tmp_path / "labels.csv"), "--data.batch_size=4", "--model.width=0.25",
                     "--trainer.max_epochs=1", "--trainer.logger=false", "--runs_dir", str(tmp_path / "runs"))  # fmt: skip
    said = " ".join(" ".join(str(w.message) for w in caught).split())
    assert "row 4" in said and "case3.png (16-bit, max" in said and "uses 12 bits or fewer of its depth" in said, said[-3000:]
    assert "row 1" in said and "case0.png (16-bit, max" in said and "Dark (underexposed) 16-bit images are fine" in said
    assert said.count("uses 12 bits or fewer of its depth") == 1, "once per table"


def test_predict_dir_with_a_bad_file_leaves_the_run_as_it_was(tiny_run, tmp_path, capsys):
    """On a copy of the domain's tiny run (tests/conftest.py): 32x32 gray synthetic images."""
    runs = tmp_path / "runs"
    run = copy_run(tiny_run("healthcare"), runs)
    before = folder_digests(run)
    incoming = tmp_path / "incoming"
    for i, image in enumerate(blob_images(3, 32, seed=4)[0]):
        write_png(incoming / f"new{i}.png", image)
    cases = {
        "corrupt": (lambda: corrupt(incoming / "new1.png", None), ("new1.png", "cannot read image")),
        "wrong size": (lambda: write_png(incoming / "new1.png", blob_images(1, 12)[0][0]), ("new1.png", "(1, 12, 12)", "--data.image_size")),
        "blank 16-bit": (lambda: png16(incoming / "new1.png", np.zeros((8, 8))), ("new1.png", "blank image")),
        "no images": (lambda: [p.unlink() for p in incoming.glob("*.png")] and (incoming / "notes.txt").write_text("x"), ("no image files",)),
    }
    for name, (spoil, expected) in cases.items():
        spoil()
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_pipeline("healthcare", "predict", "--data.predict_dir", str(incoming), "--ckpt_path", "best", "--run_id", run.name, "--runs_dir", str(runs))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, f"{name}: exit {exit_info.value.code}\n{err[-2000:]}"
        message = " ".join(err[err.index("error:") :].split())
        assert "Traceback" not in err and all(e.lower() in message.lower() for e in expected), f"{name}: {message}"
        assert folder_digests(run) == before, f"{name}: the run folder changed"
        assert not list(run.glob("predictions*.csv"))


def test_predict_says_when_images_are_darker_than_every_training_image(tiny_run, tmp_path):
    """8-bit values in 16-bit PNGs read 257 times darker (value / 65535): scored, but said at the end, naming
    the share, the training range and files (trial finding: silent, exit 0). The same pictures as 8-bit PNGs: nothing said."""
    import warnings

    from domains.healthcare.synthetic import make_lesion_images

    runs = tmp_path / "runs"
    run = copy_run(tiny_run("healthcare"), runs)
    images, _ = make_lesion_images(6, 32, seed=11)
    (tmp_path / "sixteen").mkdir()
    for i, image in enumerate(images):
        write_png(tmp_path / "eight" / f"scan{i}.png", image)
        Image.fromarray(image.astype(np.uint16)).save(tmp_path / "sixteen" / f"scan{i}.png")  # the 8-bit values themselves in a 16-bit file
    said = {}
    for folder in ("eight", "sixteen"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_pipeline("healthcare", "predict", "--data.predict_dir", str(tmp_path / folder), "--ckpt_path", "best", "--run_id", run.name,
                         "--runs_dir", str(runs), "--output", f"predictions-{folder}.csv")  # fmt: skip
        said[folder] = " ".join(str(w.message) for w in caught)
        assert len(pd.read_csv(run / f"predictions-{folder}.csv")) == 6
    assert "mean intensity outside every training image" not in said["eight"], said["eight"]
    assert "6 of 6 images (100%) have a mean intensity outside every training image" in said["sixteen"], said["sixteen"]
    assert "scan" in said["sixteen"] and "257 times darker" in said["sixteen"]


def test_a_model_trained_on_hounsfield_units_refuses_to_predict_pixel_codes(tmp_path, capsys):
    """A CT model (DICOMs in Hounsfield units, --data.intensity_range) predicting PNG exports or raw-count DICOMs
    would read their codes as Hounsfield units, all in a narrow band (trial finding: scored, exit 0): exit 2 naming
    the file and both kinds, before anything is written. DICOMs of the training kind are predicted."""
    data = tmp_path / "ct"
    data.mkdir()
    images, classes = blob_images(16, 8)
    rows = []
    for i, image in enumerate(images):
        ct_dicom(data / f"ct{i}.dcm", image)
        rows.append({"path": f"ct{i}.dcm", "label": ("benign", "malignant")[classes[i]], "split": ("train", "train", "val", "test")[i % 4]})
    pd.DataFrame(rows).to_csv(data / "labels.csv", index=False)
    runs = tmp_path / "runs"
    run_pipeline("healthcare", "fit", "--data.labels_csv", str(data / "labels.csv"), "--data.intensity_range=[-1024,3071]", "--data.batch_size=8",
                 "--model.width=0.25", "--trainer.max_epochs=1", "--runs_dir", str(runs), "--run_id", "ct")  # fmt: skip
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    ct_dicom(incoming / "a.dcm", images[0])
    write_png(incoming / "b.png", images[1])
    before = folder_digests(runs / "healthcare" / "ct")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline("healthcare", "predict", "--data.predict_dir", str(incoming), "--ckpt_path", "best", "--run_id", "ct", "--runs_dir", str(runs))
    message = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "Traceback" not in message, message[-2000:]
    assert "b.png stores pixel codes (PNG), but the model was trained on files storing physical units" in message and "[-1024, 3071]" in message, message
    assert folder_digests(runs / "healthcare" / "ct") == before
    (incoming / "b.png").unlink()
    run_pipeline("healthcare", "predict", "--data.predict_dir", str(incoming), "--ckpt_path", "best", "--run_id", "ct", "--runs_dir", str(runs))
    assert len(pd.read_csv(runs / "healthcare" / "ct" / "predictions.csv")) == 1
