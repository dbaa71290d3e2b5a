"""A finance fit that stops before its first validation keeps no alert threshold: Lightning's sanity check
(two validation batches on the untrained weights, before training) must calibrate nothing. It did: the
threshold, the alert-budget threshold and the Platt scaling of such a run came from the untrained network,
and ``predict`` wrote a definite ``is_alert`` for every row, where the README promises an empty one."""

from __future__ import annotations

import math

import torch

from tests.conftest import only_run, run_pipeline


def test_a_fit_stopped_before_validation_keeps_no_threshold_from_the_sanity_check(tmp_path):
    runs = tmp_path / "runs"
    run_pipeline(
        "finance", "fit", "--data.synthetic_rows=1200", "--data.batch_size=64", "--trainer.max_epochs=1", "--trainer.max_steps=3",
        "--trainer.num_sanity_val_steps=2", "--runs_dir", str(runs),
    )  # fmt: skip
    state = torch.load(only_run(runs, "finance") / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert math.isnan(float(state["threshold"])) and math.isnan(float(state["budget_threshold"])), (state["threshold"], state["budget_threshold"])
    assert math.isnan(float(state["probability.slope"])) and math.isnan(float(state["probability.intercept"])), "no Platt scaling either"
