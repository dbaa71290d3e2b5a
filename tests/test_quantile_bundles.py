"""Autonomous quantile models in exports and serving: the bundle and the server give the same intervals as ``predict``.

A tiny quantile forecaster and a tiny quantile regressor are trained through the runner on a
simulated fleet (real Trainer, real files); ``predict`` writes their quantile columns, the ONNX
bundle's ``quantiles`` output is read by the bundle runtime (``Bundle.intervals``, numpy and
onnxruntime only) and by a real server over HTTP, and both must equal ``predict``'s columns on the
same windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.bundle_runtime import Bundle, intervals_of
from pipelines.domain_registry import get_domain
from pipelines.export import export_checkpoint
from tests.conftest import only_run, run_pipeline
from tests.helpers import request, start_server
from tests.test_autonomous import TINY, columns, fleet, write_table
from tests.test_serve import CHECKPOINT_ATOL, observations, served_answer

LEVELS = "--model.quantiles=[0.1, 0.5, 0.9]"
NAMES = ["q10", "q50", "q90"]


def quantile_bundle(tmp_path: Path, *options: str) -> tuple[Path, pd.DataFrame, dict, dict]:
    """Train (fit + test), ``predict`` and export a tiny quantile model: its bundle, predictions, first predict batch and data settings."""
    from domains.autonomous.data import SensorSequenceDataModule
    from pipelines.export import load_task

    path = write_table(tmp_path / "fleet.csv", fleet())
    runs = tmp_path / "runs"
    args = (*TINY, *columns(f"--data.path={path}", LEVELS, *options))
    run_pipeline("autonomous", *args, "--runs_dir", str(runs))
    run = only_run(runs, "autonomous")
    run_pipeline("autonomous", "predict", *args, "--run_id", run.name, "--ckpt_path", "last", "--runs_dir", str(runs))
    ckpt = run / "checkpoints" / "last.ckpt"
    bundle = export_checkpoint(get_domain("autonomous"), ckpt, "onnx", tmp_path / "bundle")
    _, state, raw = load_task(get_domain("autonomous"), ckpt)
    settings = {k: v for k, v in raw["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    datamodule = SensorSequenceDataModule(**settings)
    datamodule.load_state_dict(state)
    datamodule.setup("predict")
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.predict_dataloader())), 0)
    predictions = pd.read_csv(run / "predictions.csv")
    assert list(predictions["sequence"][: len(batch["index"])]) == [datamodule.window_name(int(i)) for i in batch["index"]]  # same windows
    return bundle, predictions, batch, settings


def test_forecast_bundle_and_server_give_predicts_intervals(tmp_path):
    bundle, predictions, batch, settings = quantile_bundle(tmp_path)
    domain = json.loads((bundle / "metadata.json").read_text())["domain_metadata"]
    assert domain["quantiles"] == [0.1, 0.5, 0.9]
    assert domain["quantile_output"] == {"output": "quantiles", "axis": 1, "levels": [0.1, 0.5, 0.9], "names": NAMES, "median": "q50",
                                         "intervals": [{"name": "80%", "level": 0.8, "lower": "q10", "upper": "q90"}]}  # fmt: skip
    names, steps = settings["target_channels"], settings["predict"]

    def predicted(level: str, rows: int) -> np.ndarray:
        """``predict``'s positions of one level (``pred`` or ``q10``...): (rows, steps, D), in the data's units."""
        return np.stack([predictions[[f"{level}_{n}_{t}" for t in range(steps)]].to_numpy()[:rows] for n in names], -1)

    loaded = Bundle(bundle)
    outputs = loaded.run(past=batch["past"].numpy(), channels=batch["channels"].numpy())
    rows, origin = len(outputs["positions"]), batch["origin"].numpy()[:, None]
    assert outputs["quantiles"].shape == (rows, 3, steps, len(names))
    intervals = loaded.intervals(outputs)
    assert list(intervals) == ["80%"] and list(intervals["80%"]) == ["lower", "median", "upper"]
    for bound, level in (("lower", "q10"), ("median", "q50"), ("upper", "q90")):
        np.testing.assert_allclose(intervals["80%"][bound] + origin, predicted(level, rows), atol=CHECKPOINT_ATOL, err_msg=bound)
    np.testing.assert_allclose(outputs["positions"] + origin, predicted("pred", rows), atol=CHECKPOINT_ATOL)  # the median stays the first output
    assert (intervals["80%"]["lower"] <= intervals["80%"]["upper"]).all() and (intervals["80%"]["lower"] < intervals["80%"]["upper"]).any()

    served = start_server("autonomous", bundle, tmp_path / "server.log")
    try:
        windows = 3
        past = batch["past"].numpy().astype(np.float64) + origin
        sequences = [observations(past[i], batch["channels"][i], settings["channels"], names) for i in range(windows)]
        status, answer = request(served.url + "/predict", {"sequences": sequences})
        assert status == 200, answer
        for i, prediction in enumerate(answer["predictions"]):
            for k, step in enumerate(prediction["forecast"]):
                assert list(step["quantiles"]) == NAMES and list(step["intervals"]) == ["80%"], step
                interval = step["intervals"]["80%"]
                for bound, level in (("lower", "q10"), ("median", "q50"), ("upper", "q90")):
                    np.testing.assert_allclose([interval[bound][n] for n in names], predicted(level, windows)[i, k], atol=CHECKPOINT_ATOL)
                    np.testing.assert_allclose([step["quantiles"][level][n] for n in names], predicted(level, windows)[i, k], atol=CHECKPOINT_ATOL)
                np.testing.assert_allclose([step[n] for n in names], [interval["median"][n] for n in names], atol=1e-9)  # the prediction is the median
    finally:
        assert served.stop() == 0, served.output()


def test_regression_bundle_and_answers_give_predicts_intervals(tmp_path):
    from domains.autonomous.serving import ObservationsAdapter

    bundle, predictions, batch, settings = quantile_bundle(tmp_path, "--data.task=regression", "--data.target_column=aggressiveness", "--data.stride=8")
    loaded = Bundle(bundle)
    outputs = loaded.run(past=batch["past"].numpy(), channels=batch["channels"].numpy())
    rows = len(outputs["value"])
    expected = predictions[NAMES].to_numpy()[:rows]
    np.testing.assert_allclose(np.stack(list(loaded.quantiles(outputs).values()), 1), expected, atol=CHECKPOINT_ATOL)
    interval = loaded.intervals(outputs)["80%"]
    np.testing.assert_allclose(np.stack([interval["lower"], interval["median"], interval["upper"]], 1), expected, atol=CHECKPOINT_ATOL)
    np.testing.assert_allclose(outputs["value"], predictions["prediction"][:rows], atol=CHECKPOINT_ATOL)

    # the server's answer (decode, the bundle, encode, as the server runs them) for one window
    adapter = ObservationsAdapter(loaded.metadata)
    past = batch["past"][0].numpy().astype(np.float64) + batch["origin"][0].numpy()
    answer = served_answer(adapter, bundle, {"observations": observations(past, batch["channels"][0], settings["channels"], settings["target_channels"])})
    assert answer["prediction"] == pytest.approx(expected[0, 1], abs=CHECKPOINT_ATOL) and answer["target"] == "aggressiveness"
    assert answer["quantiles"] == pytest.approx(dict(zip(NAMES, expected[0])), abs=CHECKPOINT_ATOL)
    assert answer["intervals"] == {"80%": pytest.approx(dict(zip(["lower", "median", "upper"], expected[0])), abs=CHECKPOINT_ATOL)}


def test_bundles_without_quantiles_have_no_intervals():
    with pytest.raises(ValueError, match="not a quantile bundle"):
        intervals_of({"domain_metadata": {"quantiles": None}}, {"positions": torch.zeros(1, 2, 2).numpy()})
