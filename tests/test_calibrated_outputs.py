"""Calibrated outputs end to end (issue 18): a binary healthcare run on learnable images fits its
temperature and cost-based operating point on validation, keeps them in the checkpoint, and predict,
the exported bundle and the server's decision agree; test metrics carry bootstrap intervals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from domains.healthcare.data import MedicalImageDataModule
from pipelines.bundle_runtime import Bundle
from pipelines.calibration import operating_threshold, probabilities
from pipelines.export import load_task
from pipelines.domain_registry import get_domain
from tests.conftest import only_run, run_pipeline
from tests.medical_files import blob_images

TRAIN = (
    "--trainer.max_epochs=3", "--data.batch_size=16", "--model.network=resnet10", "--model.width=0.25",
    "--model.threshold_method=cost", "--model.cost_fn=5", "--model.cost_fp=1",
)  # fmt: skip


def blob_npz(path, counts=(64, 48, 48), size=16):
    """A MedMNIST-style binary set: label 1 has a bright square (noisy, so probabilities are not all 0 or 1)."""
    arrays = {}
    for seed, (split, n) in enumerate(zip(("train", "val", "test"), counts)):
        images, labels = blob_images(n, size, seed=seed)
        flip = np.random.default_rng(seed + 10).random(n) < 0.1  # 10 % label noise: a calibration to fit
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, np.where(flip, 1 - labels, labels).reshape(n, 1)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrated")
    npz = blob_npz(folder / "blobs.npz")
    runs_dir = folder / "runs"
    run_pipeline("healthcare", *TRAIN, "--data.npz_path", str(npz), "--runs_dir", str(runs_dir))
    return only_run(runs_dir, "healthcare"), npz


def validation_logits(task, npz):
    datamodule = MedicalImageDataModule(npz_path=str(npz), batch_size=64)
    datamodule.setup("fit")
    logits, labels = [], []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            batch = datamodule.on_after_batch_transfer(batch, 0)
            logits.append(task(batch["image"])[:, 0])
            labels.append(batch["label"])
    return torch.cat(logits), torch.cat(labels)


def test_the_checkpoint_holds_the_temperature_and_the_cost_optimal_threshold_of_its_weights(binary_run):
    run, npz = binary_run
    task, _, ckpt = load_task(get_domain("healthcare"), run / "checkpoints" / "best.ckpt")
    temperature, threshold = float(ckpt["state_dict"]["calibration.state.temperature"]), float(ckpt["state_dict"]["calibration.state.threshold"])
    assert temperature != 1.0 and 0 < threshold < 1
    logits, labels = validation_logits(task, npz)
    probs = probabilities(logits, temperature)
    assert threshold == pytest.approx(operating_threshold(probs, labels, "cost", cost_fn=5, cost_fp=1), abs=1e-6)
    cost = lambda t: 5 * int(((probs < t) & (labels == 1)).sum()) + int(((probs >= t) & (labels == 0)).sum())  # noqa: E731
    assert cost(threshold) == min(cost(t) for t in [*probs.tolist(), 1.1])  # brute force over every cut


def test_test_metrics_have_intervals_and_calibration_plots(binary_run):
    run, _ = binary_run
    summary = json.loads((run / "summary.json").read_text())
    test, intervals = summary["test"], summary["test_intervals"]
    for name in ("test/auroc", "test/accuracy", "test/f1", "test/loss", "test/ece", "test/brier", "test/sensitivity", "test/specificity"):
        assert intervals[name]["low"] <= test[name] + 1e-6 and test[name] - 1e-6 <= intervals[name]["high"], name
    for name in ("test/accuracy", "test/loss", "test/ece", "test/brier"):  # 48 rows: a real spread (rates may sit at 1.0)
        assert intervals[name]["low"] < intervals[name]["high"], name
    ckpt = torch.load(summary["best_checkpoint"], weights_only=True)  # the tested checkpoint's own operating point and temperature
    assert test["test/threshold"] == pytest.approx(float(ckpt["state_dict"]["calibration.state.threshold"]))
    assert test["test/temperature"] == pytest.approx(float(ckpt["state_dict"]["calibration.state.temperature"])) and 0 <= test["test/ece"] < 0.5
    for plot in ("test_reliability_diagram.png", "test_confusion_matrix.png", "test_roc_curve.png"):
        assert (run / "plots" / plot).stat().st_size > 5000


def test_predict_bundle_and_server_decision_give_the_same_calibrated_probability(binary_run, tmp_path):
    run, npz = binary_run
    run_pipeline("healthcare", "predict", "--run_id", run.name, "--runs_dir", str(run.parent.parent), "--ckpt_path", "best", "--data.npz_path", str(npz))
    predictions = pd.read_csv(run / "predictions.csv")
    run_pipeline("healthcare", "export", "--run_id", run.name, "--runs_dir", str(run.parent.parent), "--ckpt_path", "best", "--output", str(tmp_path / "bundle"))
    bundle = Bundle(tmp_path / "bundle")
    threshold = bundle.metadata["domain_metadata"]["decision_threshold"]
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert threshold == pytest.approx(float(ckpt["state_dict"]["calibration.state.threshold"]))
    images = np.load(npz)["test_images"][:, None].astype(np.float32) / 255.0
    served = bundle.run(image=images)["probabilities"][:, 1]
    np.testing.assert_allclose(predictions["prob_1"].to_numpy(), served, atol=1e-4)
    assert (predictions["prediction"].astype(str) == np.where(served >= threshold, "1", "0")).all()
    from domains.healthcare.serving import ImageUploadAdapter

    adapter = ImageUploadAdapter(bundle.metadata)
    near = float(served[np.argmin(np.abs(served - threshold))])
    assert adapter.encode({"probabilities": np.array([[1 - near, near]])})["prediction"] == ("1" if near >= threshold else "0")
