"""Validation and test losses as means over the samples scored (pipelines/evaluation_means.py).

The 2-process half (the processes' means were averaged as equals) is checked by the real DDP runs:
``tests/test_platform.py`` (healthcare) and ``tests/test_ddp_evaluation.py`` (the other domains, slow).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipelines.evaluation_means import EvaluationMeans, WeightedMean
from tests.conftest import copy_run, run_pipeline


def test_a_class_weighted_test_loss_is_the_whole_splits_however_it_is_batched(tiny_run, tmp_path):
    """Healthcare's class-weighted cross-entropy is a mean over the targets' class weights: weighting each batch by
    its size made the epoch's loss depend on how the test split was batched (and so on the number of processes)."""
    run = copy_run(tiny_run("healthcare"), tmp_path / "runs")
    weights = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)["hyper_parameters"]["class_weights"]
    assert len(set(weights)) > 1, f"the check needs unequal class weights, got {weights}"
    losses = []
    for batch_size in (16, 5):
        run_pipeline("healthcare", "test", "--runs_dir", str(tmp_path / "runs"), "--run_id", run.name, "--ckpt_path", "best",
                     f"--data.batch_size={batch_size}", "--trainer.devices", "1")  # fmt: skip
        losses.append(json.loads((run / "summary.json").read_text())["test"]["test/loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5), losses


def test_a_nan_value_makes_the_mean_nan_and_the_means_add_nothing_to_a_checkpoint():
    """A diverged model's NaN loss is not dropped from the mean (torchmetrics' MeanMetric drops it by default); the
    metrics' states are not saved, so checkpoints written before them load strictly, and the other way round."""
    mean = WeightedMean()
    mean.update(torch.tensor(1.0), 4)
    mean.update(torch.tensor(float("nan")), 1)
    assert math.isnan(float(mean.compute()))
    means = EvaluationMeans(["val/loss", "test/prevalence_1.5"])
    assert means.state_dict() == {}
    holder = torch.nn.Module()
    holder.means = means
    holder.load_state_dict({}, strict=True)
    with pytest.raises(ValueError, match="given twice"):
        EvaluationMeans(["val/a.b", "val/a_b"])
