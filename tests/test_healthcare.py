"""Healthcare: every input format from real files on disk, each bad input, and the model options."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from domains.healthcare.data import MedicalImageDataModule, stratified_split
from domains.healthcare.model import ImageClassifier
from domains.healthcare.networks import build_network, load_pretrained_weights
from pipelines.data import build_albumentations
from tests.conftest import only_run, run_pipeline, shared_file
from tests.medical_files import blob_images, write_dicom, write_medmnist_npz, write_nifti, write_png

FAST = (
    "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1", "--data.batch_size=8", "--model.network=resnet10",
    "--model.width=0.25",
)  # fmt: skip


def image_table(tmp_path, count=24, size=16, writer=write_png, suffix=".png", split=True, labels=None):
    images, classes = blob_images(count, size)
    names = ["benign", "malignant"]
    rows = []
    for i, (image, label) in enumerate(zip(images, classes)):
        path = writer(tmp_path / "images" / f"case{i:03d}{suffix}", image)
        row = {"path": str(path.relative_to(tmp_path)), "label": labels[i] if labels else names[label]}
        if split:
            row["split"] = ("train", "train", "val", "test")[i % 4]
        rows.append(row)
    csv = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


# ----- data sources -------------------------------------------------------------------------------
def test_synthetic_default_is_deterministic_and_imbalanced():
    a, b = MedicalImageDataModule(synthetic_samples=120), MedicalImageDataModule(synthetic_samples=120)
    a.setup(), b.setup()
    assert np.array_equal(a.datasets["train"].images, b.datasets["train"].images)
    assert a.num_classes == 3 and a.task == "multiclass" and a.class_names == ["normal", "benign", "malignant"]
    weights = a.class_weights
    assert weights[0] < weights[1] < weights[2]  # rarer classes weigh more
    assert {len(a.datasets[s]) for s in ("train", "val", "test")} and sum(len(a.datasets[s]) for s in ("train", "val", "test")) == 120


@pytest.mark.parametrize(
    ("shape", "label_columns", "classes", "task", "dims", "channels"),
    [
        ((16, 16), 1, 2, "binary", 2, 1),
        ((16, 16, 3), 1, 4, "multiclass", 2, 3),
        ((16, 16), 5, 2, "multilabel", 2, 1),
        ((8, 8, 8), 1, 3, "multiclass", 3, 1),
    ],
)
def test_medmnist_npz_layouts(tmp_path, shape, label_columns, classes, task, dims, channels):
    path = write_medmnist_npz(tmp_path / "set.npz", shape, label_columns, classes)
    dm = MedicalImageDataModule(npz_path=str(path), batch_size=4)
    assert (dm.task, dm.spatial_dims, dm.in_channels) == (task, dims, channels)
    assert dm.num_classes == (label_columns if task == "multilabel" else classes)
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [24, 8, 8]  # official splits kept
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, channels, *([8] * 3 if dims == 3 else [16, 16]))
    assert type(batch["image"]) is torch.Tensor and batch["image"].dtype == torch.float32


def test_3d_volume_trains_end_to_end(tmp_path, runs_dir):
    path = write_medmnist_npz(tmp_path / "vol.npz", (8, 8, 8), 1, 2, counts=(16, 4, 4))
    run_pipeline("healthcare", *FAST, "--data.npz_path", str(path), "--data.batch_size=4", "--runs_dir", str(runs_dir))
    summary = json.loads((only_run(runs_dir, "healthcare") / "summary.json").read_text())
    assert "test/auroc" in summary["test"]


def write_png16(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array).astype(np.uint16)).save(path)
    return path


def mixed_depths(path, array):
    """8-bit PNG, 16-bit PNG or 16-bit DICOM by the file number: one data set of mixed bit depths."""
    number = int(path.stem[-3:])
    if number % 3 == 1:
        return write_png16(path, array.astype(np.uint16) * 257)
    if number % 3 == 2:
        return write_dicom(path.with_suffix(".dcm"), array.astype(np.uint16) * 257)
    return write_png(path, array)


def test_mixed_bit_depth_folder_trains_and_predicts_the_same_picture_alike(tmp_path, runs_dir):
    """One intensity rule (pipelines/images.py): a data set mixing 8-bit PNG, 16-bit PNG and 16-bit DICOM
    trains; the same picture in the three forms gives pixels within 1/255 and the same prediction."""
    csv = image_table(tmp_path, writer=mixed_depths)
    dm = MedicalImageDataModule(labels_csv=str(csv))
    dm.setup()
    assert dm.datasets["train"].images.dtype == np.float32  # 8- and 16-bit files in one float array in [0, 1]
    blobs, _ = blob_images(24, 16)
    for row, index in enumerate(dm.datasets["train"].indices):
        assert np.abs(dm.datasets["train"].images[row, 0] - blobs[index] / 255.0).max() < 1e-6
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 40000, (3, 16, 16)).astype(np.uint16)  # real 16-bit content
    truth[:2, 5:11, 5:11] = 56000  # two with the bright square of the positive class
    folder = tmp_path / "incoming"
    for i, image in enumerate(truth):
        write_png(folder / f"p{i}_8bit.png", np.rint(image / 257.0).astype(np.uint8))
        write_png16(folder / f"p{i}_16bit.png", image)
        write_dicom(folder / f"p{i}_16bit.dcm", image)
    from pipelines.images import read_image, unit_float

    for i in range(3):
        values = [unit_float(read_image(folder / f"p{i}_{kind}")) for kind in ("8bit.png", "16bit.png", "16bit.dcm")]
        assert np.abs(values[0] - values[1]).max() <= 1 / 255 and np.array_equal(values[1], values[2])
        assert abs(float(values[0].mean()) - float(truth[i].mean()) / 65535) < 1 / 255
    # two real loader worker processes: what a GPU machine gets by default (pipelines.data.default_workers)
    run_pipeline("healthcare", *FAST, "--data.labels_csv", str(csv), "--data.num_workers=2", "--runs_dir", str(runs_dir))
    run = only_run(runs_dir, "healthcare")
    for plot in ("test_confusion_matrix.png", "test_roc_curve.png", "test_sample_predictions.png"):
        assert (run / "plots" / plot).stat().st_size > 1000
    run_pipeline(
        "healthcare", "predict", *FAST, "--data.labels_csv", str(csv), "--data.predict_dir", str(folder),
        "--ckpt_path", "best", "--run_id", run.name, "--runs_dir", str(runs_dir),
    )  # fmt: skip
    predictions = pd.read_csv(run / "predictions.csv").set_index("item")
    assert len(predictions) == 9 and set(predictions["prediction"]) <= {"benign", "malignant"}
    assert predictions["prob_malignant"].between(0, 1).all()
    for i in range(3):
        rows = predictions.loc[[str(folder / f"p{i}_{kind}") for kind in ("8bit.png", "16bit.png", "16bit.dcm")]]
        assert rows["prediction"].nunique() == 1, rows
        assert rows["prob_malignant"].max() - rows["prob_malignant"].min() < 0.02, rows
    summary = json.loads((run / "summary.json").read_text())
    assert "test/prevalence_malignant" in summary["test"]  # the positive class, named in the run's metrics
    ckpt = torch.load(run / "checkpoints/best.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["positive_class"] == ckpt["MedicalImageDataModule"]["positive_class"] == "malignant"


def test_dicom_in_hounsfield_units_needs_a_range_and_is_never_clipped_silently(tmp_path):
    import pydicom

    from pipelines.errors import InputError
    from pipelines.images import Intensity, read_image

    stored = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)  # 12-bit CT: HU = stored - 1024
    path = write_dicom(tmp_path / "ct.dcm", stored)
    ds = pydicom.dcmread(path)
    ds.RescaleIntercept, ds.RescaleSlope, ds.BitsStored, ds.HighBit = -1024, 1, 12, 11
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.save_as(path)
    with pytest.raises(InputError, match=r"physical units \(RescaleSlope 1, RescaleIntercept -1024.*--data.intensity_range"):
        read_image(path)
    full = read_image(path, Intensity("range", (-1024, 3071)))
    assert np.allclose(full[0], stored / 4095.0, atol=1e-6)  # the whole HU range, nothing clipped
    window = read_image(path, Intensity("dicom_window"))[0]
    hu = stored.astype(float) - 1024
    assert window[hu <= 40 - 200].max() == 0 and window[hu >= 40 + 200].min() == 1  # the file's soft-tissue window
    inside = (hu > -150) & (hu < 230)
    assert np.allclose(window[inside], np.clip((hu[inside] - 39.5) / 399 + 0.5, 0, 1), atol=1e-6)


def test_dicom_files_are_read_and_scaled(tmp_path):
    csv = image_table(tmp_path, writer=lambda p, a: write_dicom(p, a.astype(np.uint16) * 16), suffix=".dcm")
    dm = MedicalImageDataModule(labels_csv=str(csv))
    dm.setup()
    images = dm.datasets["train"].images
    assert images.dtype == np.float32 and images.shape[1:] == (1, 16, 16)
    blobs, _ = blob_images(24, 16)  # by bit depth (BitsStored 16): stored / 65535, never the image's own min-max
    assert np.allclose(images[:, 0], blobs[dm.datasets["train"].indices].astype(np.float64) * 16 / 65535, atol=1e-7)


def test_nifti_volumes_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        size = 10 if i % 2 else 12  # different sizes: resized to one by --data.image_size
        path = write_nifti(tmp_path / f"vol{i}.nii.gz", rng.random((size, size, size)))
        rows.append({"path": path.name, "label": "a" if i % 2 else "b", "split": ("train", "val", "test", "train")[i % 4]})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(ValueError, match=r"has size .* set --data.image_size"):
        MedicalImageDataModule(labels_csv=str(tmp_path / "labels.csv"), positive_class="a").setup()
    dm = MedicalImageDataModule(labels_csv=str(tmp_path / "labels.csv"), image_size=8, positive_class="a")
    assert dm.spatial_dims == 3 and dm.image_shape == (1, 8, 8, 8)
    dm.setup()
    assert dm.datasets["train"].images.shape[1:] == (1, 8, 8, 8)
    assert next(iter(dm.train_dataloader()))["image"].shape[1:] == (1, 8, 8, 8)


def test_multilabel_csv_and_stratified_split_without_split_column(tmp_path):
    labels = ["effusion|nodule" if i % 3 == 0 else ("nodule" if i % 3 == 1 else "effusion") for i in range(30)]
    csv = image_table(tmp_path, count=30, split=False, labels=labels)
    dm = MedicalImageDataModule(labels_csv=str(csv), val_fraction=0.2, test_fraction=0.2)
    assert dm.task == "multilabel" and dm.class_names == ["effusion", "nodule"]
    assert dm.source.labels[0].tolist() == [1, 1]
    assert {name: int((dm.split_assignment == name).sum()) for name in ("train", "val", "test")} == {"train": 18, "val": 6, "test": 6}


def test_stratified_split_keeps_class_proportions():
    labels = np.array([0] * 80 + [1] * 20)
    split = stratified_split(labels, 0.1, 0.2, seed=3)
    assert (labels[split == "test"] == 1).sum() == 4 and (labels[split == "val"] == 1).sum() == 2
    assert np.array_equal(split, stratified_split(labels, 0.1, 0.2, seed=3))


def test_weighted_sampler_balances_batches():
    dm = MedicalImageDataModule(synthetic_samples=300, balance="sampler", batch_size=300)
    dm.setup()
    assert dm.class_weights is None
    labels = next(iter(dm.train_dataloader()))["label"]
    counts = torch.bincount(labels, minlength=3).float()
    assert counts.min() / counts.max() > 0.5  # raw data is 60/25/15


def test_real_breastmnist_loads_with_official_splits():
    dm = MedicalImageDataModule(npz_path=str(shared_file("healthcare/breastmnist.npz")))
    assert dm.task == "binary" and dm.num_classes == 2
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [546, 78, 156]
    assert int(dm.datasets["test"].labels.sum()) == 114


# ----- bad input: a clear error naming the file/row, before training ------------------------------
def test_missing_image_names_the_row(tmp_path):
    csv = image_table(tmp_path)
    (tmp_path / "images" / "case005.png").unlink()
    with pytest.raises(ValueError, match=r"row 6: .*case005.png"):
        MedicalImageDataModule(labels_csv=str(csv)).num_classes


def test_unreadable_image_names_the_file(tmp_path):
    csv = image_table(tmp_path)
    (tmp_path / "images" / "case003.png").write_bytes(b"not a png at all")
    dm = MedicalImageDataModule(labels_csv=str(csv))
    with pytest.raises(ValueError, match=r"row 4: cannot read image .*case003.png"):
        dm.setup()


def test_label_not_in_class_list(tmp_path):
    csv = image_table(tmp_path)
    with pytest.raises(ValueError, match=r"label 'malignant' \(12 rows\) is not one of the declared classes \['benign', 'normal'\].*first at row 2 "):
        MedicalImageDataModule(labels_csv=str(csv), class_names=["benign", "normal"]).num_classes


def test_csv_without_the_columns(tmp_path):
    (tmp_path / "bad.csv").write_text("file,diagnosis\na.png,x\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['path', 'label'\].*found \['file', 'diagnosis'\]"):
        MedicalImageDataModule(labels_csv=str(tmp_path / "bad.csv")).num_classes


def test_empty_split(tmp_path):
    csv = image_table(tmp_path)
    table = pd.read_csv(csv)
    table["split"] = table["split"].replace("val", "train")
    table.to_csv(csv, index=False)
    with pytest.raises(ValueError, match="split 'val' is empty"):
        MedicalImageDataModule(labels_csv=str(csv)).class_weights


def test_npz_without_the_expected_keys(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8)), labels=np.zeros(4))
    with pytest.raises(ValueError, match=r"x.npz: missing key\(s\) \['train_images'"):
        MedicalImageDataModule(npz_path=str(tmp_path / "x.npz")).num_classes


def test_mismatched_image_sizes_and_channels(tmp_path):
    csv = image_table(tmp_path)
    write_png(tmp_path / "images" / "case004.png", np.indices((20, 20)).sum(0).astype(np.uint8))
    with pytest.raises(ValueError, match=r"row 5: image .*case004.png has size \(20, 20\) but .* has \(16, 16\)"):
        MedicalImageDataModule(labels_csv=str(csv)).setup()
    write_png(tmp_path / "images" / "case004.png", np.indices((16, 16, 3)).sum(0).astype(np.uint8))
    with pytest.raises(ValueError, match=r"row 5: image .*case004.png has 3 channel\(s\)"):
        MedicalImageDataModule(labels_csv=str(csv)).setup()


def test_bad_augmentation_is_rejected_at_construction():
    with pytest.raises(ValueError, match="albumentations has no transform 'HorizontalFlipp'"):
        build_albumentations([{"HorizontalFlipp": {"p": 0.5}}])
    with pytest.raises(ValueError, match="invalid arguments for HorizontalFlip"):
        build_albumentations([{"HorizontalFlip": {"probability": 0.5}}])


def test_network_that_cannot_take_the_image_size_fails_before_training(tmp_path, runs_dir, capsys):
    path = write_medmnist_npz(tmp_path / "tiny.npz", (8, 8))
    with pytest.raises(SystemExit) as exit_info:  # bad input: exit 2 before the run folder exists
        run_pipeline("healthcare", *FAST, "--model.network=densenet121", "--model.width=1", "--data.npz_path", str(path), "--runs_dir", str(runs_dir))
    message = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "network 'densenet121' cannot take inputs of shape (1, 8, 8)" in message and "at least 32" in message
    assert not runs_dir.exists()
    model = ImageClassifier(network="resnet18", input_shape=[1, 8, 8])  # a small-stem ResNet takes 8 pixels
    with pytest.raises(ValueError, match=r"needs at least 8 pixels; set --data.image_size 8"):
        model.check_input_shape((1, 4, 4))  # a 4x4 image would run (adaptive pooling) on padding alone


# ----- networks and checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["densenet121", "resnet18", "resnet50", "efficientnet-b0"])
def test_monai_networks_2d_and_3d(name):
    net = build_network(name, 2, 3, 4, small_input_stem=False)
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 4)
    if name == "resnet18":
        assert build_network(name, 3, 1, 2)(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2)


def test_resnet_width_scales_the_channels_and_is_refused_for_other_networks():
    full, quarter = build_network("resnet18", 2, 1, 2), build_network("resnet18", 2, 1, 2, width=0.25)
    assert quarter.conv1.out_channels == full.conv1.out_channels // 4 == 16
    assert quarter(torch.zeros(2, 1, 28, 28)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"width 0.5 for network 'densenet121'"):
        build_network("densenet121", 2, 1, 2, width=0.5)
    with pytest.raises(ValueError, match="expected a positive multiplier"):
        build_network("resnet18", 2, 1, 2, width=0)


def test_pretrained_weights_load_from_safetensors_and_skip_a_different_head(tmp_path):
    from safetensors.torch import save_file

    source = build_network("resnet10", 2, 1, 5)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    target = build_network("resnet10", 2, 1, 2)
    skipped = load_pretrained_weights(target, tmp_path / "w.safetensors")
    assert skipped == ["fc.bias", "fc.weight"]
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_checkpoint_holds_fitted_state_and_loads_weights_only(tmp_path, runs_dir):
    path = write_medmnist_npz(tmp_path / "set.npz", (16, 16), 1, 3)
    run_pipeline("healthcare", *FAST, "--data.npz_path", str(path), "--data.class_names=[a,b,c]", "--runs_dir", str(runs_dir))
    ckpt = torch.load(only_run(runs_dir, "healthcare") / "checkpoints/best.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == ["a", "b", "c"]
    state = ckpt["MedicalImageDataModule"]
    assert state["class_names"] == ["a", "b", "c"] and len(state["channel_mean"]) == 1
    model = ImageClassifier(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    model.load_state_dict(ckpt["state_dict"])
    dm = MedicalImageDataModule(npz_path=str(path), class_names=["a", "c", "b"])
    with pytest.raises(ValueError, match="trained on classes"):
        dm.load_state_dict(state)
