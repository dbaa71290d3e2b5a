"""Autonomous covariates as pytorch-forecasting users expect: future-known channels, per-group
normalisation and embedded categorical channels, through fit, test, predict, export and serving.

The data's answer is known: each trip follows a speed plan (x advances by plan x 0.1 per step) that
changes at random, so the plan's future values say where the vehicle will be and its past does not;
a speed channel is scaled per vehicle type (cars about 20 +- 5, trucks 8 +- 1); a regression target
is an offset set by the road type alone. Every run is a real Trainer through the runner, in-process.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.bad_inputs import BadInput, check_refused, params
from tests.conftest import only_run, run_pipeline
from tests.test_bad_inputs_autonomous import CSV, contains, fleet, setter, table_file

ROADS = ["urban", "rural", "highway"]
OFFSET = {"urban": -1.0, "rural": 0.0, "highway": 2.0}
OBSERVE, PREDICT, STEPS = 4, 6, 16
QUIET = ("--trainer.logger=false", "--trainer.enable_progress_bar=false", "--model.plot_samples=0")


def planned_trips(trips: int = 100, seed: int = 0) -> pd.DataFrame:
    """Trips following a speed plan that jumps at random; vehicle type, road type, a per-type scaled speed and a road-set target."""
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(trips):
        plan = np.where(rng.random(STEPS) < 0.35, rng.uniform(0, 3, STEPS), np.nan)
        plan[0] = rng.uniform(0, 3)
        plan = pd.Series(plan).ffill().to_numpy()
        vehicle, road = ("truck" if i % 2 else "car"), ROADS[i % 3]
        parts.append(pd.DataFrame({
            "sequence": f"s{i:03d}", "time": np.round(np.arange(STEPS) * 0.1, 6), "x": np.concatenate([[0], np.cumsum(plan[:-1])]) * 0.1,
            "y": rng.normal(0, 0.01, STEPS).cumsum(), "plan": plan, "speed": rng.normal(*((8, 1) if vehicle == "truck" else (20, 5)), STEPS),
            "vehicle": vehicle, "road": road, "offset": OFFSET[road] + rng.normal(0, 0.1), "split": "train" if i % 10 < 7 else ("val" if i % 10 < 8 else "test"),
        }))  # fmt: skip
    table = pd.concat(parts, ignore_index=True)
    table.loc[table["sequence"] == "s099", "road"] = "gravel"  # a test trip on a road never seen in training
    return table


COMMON = ("--data.target_channels=[x, y]", "--data.categorical_channels=[road]", "--data.group_column=vehicle", "--data.normalize_by=group",
          "--data.split_column=split", f"--data.observe={OBSERVE}", f"--data.predict={PREDICT}", "--data.stride=2", "--data.batch_size=32",
          "--model.hidden_size=16", "--model.embed_size=8", "--model.lr=0.01", "--trainer.max_epochs=4", *QUIET)  # fmt: skip
KNOWN = ("--data.channels=[speed]", "--data.known_future_channels=[plan]")


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The same forecaster trained with the plan as a future-known channel and as a past-only channel (about 5 s each)."""
    folder = tmp_path_factory.mktemp("autonomous-covariates")
    table = planned_trips()
    table.to_csv(folder / "trips.csv", index=False)
    runs = {}
    for name, options in (("known", KNOWN), ("past", ("--data.channels=[speed, plan]",))):
        run_pipeline("autonomous", f"--data.path={folder / 'trips.csv'}", *COMMON, *options, "--runs_dir", str(folder / name))
        run = only_run(folder / name, "autonomous")
        runs[name] = (run, json.loads((run / "summary.json").read_text())["test"])
    return folder, table, runs


def test_a_future_known_channel_forecasts_much_better_than_the_same_channel_seen_only_in_the_past(planned):
    _, _, runs = planned
    known, past = runs["known"][1], runs["past"][1]
    # measured: ADE 0.072 with the plan's future, 0.170 with its past only (FDE 0.077 and 0.253)
    assert known["test/ade"] < 0.5 * past["test/ade"] and known["test/fde"] < 0.5 * past["test/fde"], (known, past)
    assert "test/attribution_plan" in known and "test/attribution_road" in known  # the past of every input column is attributed


def test_group_statistics_and_vocabulary_are_fitted_on_training_rows_and_saved_in_the_checkpoint(planned):
    _, table, runs = planned
    checkpoint = torch.load(runs["known"][0] / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    state = checkpoint["SensorSequenceDataModule"]
    assert state["vocabularies"] == {"road": ["highway", "rural", "urban"]}  # 'gravel' is only in the test split
    assert state["known_future_channels"] == ["plan"] and state["channel_names"] == ["speed", "plan"]
    groups = state["groups"]
    assert groups["column"] == "vehicle" and groups["names"] == ["car", "truck"]
    # windows of 10 rows every 2 rows in 16-row trips: the observed rows of training windows are each trip's first 10
    train = table[(table["split"] == "train") & (np.round(table["time"] / 0.1) < 10)]
    for g, name in enumerate(groups["names"]):
        rows = train[train["vehicle"] == name]
        np.testing.assert_allclose(groups["channel_mean"][g], rows[["speed", "plan"]].mean(), rtol=1e-5)
        np.testing.assert_allclose(groups["channel_std"][g], rows[["speed", "plan"]].std(ddof=0), rtol=1e-4)
    assert abs(groups["channel_mean"][0][0] - 20) < 1.5 and abs(groups["channel_mean"][1][0] - 8) < 0.5 and abs(groups["channel_std"][1][0] - 1) < 0.2
    assert 12 < state["channel_mean"][0] < 16  # the global statistics, kept for unseen groups
    embedding = checkpoint["state_dict"]["network.encoder.categorical.embeddings.0.weight"]  # nn.Embedding in the plain network
    assert embedding.shape[0] == 4  # three roads and the unknown bucket


def new_trips(folder: Path) -> tuple[Path, pd.DataFrame]:
    """Six trips to forecast: 10 observed rows, then 6 future rows giving the plan but no position (s005: only 3);
    an unseen vehicle type ('bus') and a road typo ('urbna')."""
    table = planned_trips(6, seed=5).drop(columns=["split"])
    table.loc[table["sequence"] == "s000", "vehicle"] = "bus"
    table.loc[table["sequence"] == "s001", "road"] = "urbna"
    table.loc[np.round(table["time"] / 0.1) >= 10, ["x", "y"]] = np.nan
    table = table[~((table["sequence"] == "s005") & (np.round(table["time"] / 0.1) >= 13))]
    table.to_csv(folder / "new.csv", index=False)
    return folder / "new.csv", table


def test_predict_reads_future_rows_and_warns_about_unseen_groups_and_categories(planned, capsys):
    folder, _, runs = planned
    run = runs["known"][0]
    path, table = new_trips(folder)
    capsys.readouterr()
    run_pipeline("autonomous", "predict", "--run_id", run.name, "--ckpt_path", "best", f"--data.predict_path={path}", "--output", "new.csv",
                 "--runs_dir", str(run.parent.parent), *QUIET)  # fmt: skip
    err = capsys.readouterr().err
    assert contains(err, "predict: group(s) of 'vehicle' not seen in training use the global statistics: 'bus'"), err
    assert contains(err, "column 'road': 'urbna'") and contains(err, "closest known: 'urban'"), err
    assert contains(err, "1 sequence(s) get no forecast from their last observation (fewer than 6 future rows") and "['s005']" in err, err
    predictions = pd.read_csv(run / "new.csv")
    last = predictions.groupby("sequence").tail(1).set_index("sequence")["time"]
    assert set(last.index) == set(table["sequence"]) and np.allclose(last.drop("s005"), 0.9)  # the observation ends at the last position
    assert last["s005"] == pytest.approx(0.5)  # the latest window (stride 2) whose 6 future rows are in the file
    final = predictions.groupby("sequence").tail(1).set_index("sequence").drop("s005")
    assert final[[f"true_x_{k}" for k in range(PREDICT)]].isna().all().all()  # the future was not given: no truth
    assert predictions[[f"pred_x_{k}" for k in range(PREDICT)]].notna().all().all()
    # the checkpoint's covariates must be the command's
    with pytest.raises(SystemExit) as stop:
        run_pipeline("autonomous", "predict", "--run_id", run.name, "--ckpt_path", "best", f"--data.predict_path={path}", "--data.categorical_channels=[]",
                     "--runs_dir", str(run.parent.parent), *QUIET)  # fmt: skip
    assert stop.value.code == 2 and contains(capsys.readouterr().err, "trained with --data.categorical_channels ['road']")


def test_exported_bundle_serves_the_predictions_with_covariates_and_warnings(planned, tmp_path):
    from fastapi import HTTPException

    from domains.autonomous.serving import ObservationsAdapter, SequencesAdapter
    from pipelines.bundle_runtime import Bundle
    from pipelines.domain_registry import get_domain
    from pipelines.export import export_checkpoint

    folder, _, runs = planned
    run = runs["known"][0]
    path, table = new_trips(tmp_path)
    run_pipeline("autonomous", "predict", "--run_id", run.name, "--ckpt_path", "best", f"--data.predict_path={path}", "--output", "served.csv",
                 "--runs_dir", str(run.parent.parent), *QUIET)  # fmt: skip
    expected = pd.read_csv(run / "served.csv").groupby("sequence").tail(1).set_index("sequence")
    bundle = Bundle(export_checkpoint(get_domain("autonomous"), run / "checkpoints" / "best.ckpt", "onnx", tmp_path / "bundle"))
    metadata = bundle.metadata["domain_metadata"]
    assert [spec["name"] for spec in bundle.metadata["inputs"]] == ["past", "channels", "known", "codes", "group"]
    assert metadata["vocabularies"] == {"road": ["highway", "rural", "urban"]} and metadata["group_names"] == ["car", "truck"]

    def body(sequence: str) -> tuple[list[dict], list[dict]]:
        rows = table[table["sequence"] == sequence]
        observed, future = rows[rows["x"].notna()], rows[rows["x"].isna()]
        observations = [{"time": r.time, "x": r.x, "y": r.y, "speed": r.speed, "plan": r.plan, "road": r.road, "vehicle": r.vehicle} for r in observed.itertuples()]
        return observations, [{"plan": r.plan} for r in future.itertuples()]

    single, several = ObservationsAdapter(bundle.metadata), SequencesAdapter(bundle.metadata)
    names = ["s000", "s001", "s002"]
    answers = several.encode(several.infer(several.decode({"sequences": [body(s)[0] for s in names], "futures": [body(s)[1] for s in names]}), bundle.run))
    for sequence, answer in zip(names, answers["predictions"]):
        served = [step["x"] for step in answer["forecast"]]
        np.testing.assert_allclose(served, expected.loc[sequence, [f"pred_x_{k}" for k in range(PREDICT)]].to_numpy(float), atol=1e-4)
    assert answers["predictions"][0]["warnings"] == ["vehicle: group not seen in training; the global normalisation statistics were used"]
    assert answers["predictions"][1]["warnings"][0].startswith("road: 4 observation(s) with a category not seen in training")  # of the 4 read (observe)
    assert "warnings" not in answers["predictions"][2]

    observations, future = body("s002")
    for request, message in (
        ({"observations": observations, "future": future[:5]}, r"^422: future: expected the 6 forecast steps' future-known values \['plan'\]"),
        ({"observations": observations, "future": [{**future[0], "speed": 1.0}, *future[1:]]}, r"^422: future\[0\]\.speed: unknown field"),
        ({"observations": [{k: v for k, v in row.items() if k != "road"} for row in observations], "future": future}, r"^422: observations\[6\]\.road: missing channel"),
        ({"observations": [{**row, "vehicle": True} for row in observations], "future": future}, r"^422: observations\[9\]\.vehicle: expected a category"),
    ):  # fmt: skip
        with pytest.raises(HTTPException, match=message):
            single.decode(request)


def test_an_embedded_road_type_predicts_the_offset_it_sets(tmp_path):
    """Regression of an offset set by the road type alone: embedded, the RMSE is far below the offset's spread, which
    no model without the category can beat (its other inputs are independent of the offset; measured: 1.22 without it)."""
    table = planned_trips(60)
    table.to_csv(tmp_path / "trips.csv", index=False)
    common = (f"--data.path={tmp_path / 'trips.csv'}", "--data.task=regression", "--data.target_column=offset", "--data.target_channels=[x, y]",
              "--data.channels=[plan]", "--data.split_column=split", "--data.observe=4", "--data.stride=2", "--data.batch_size=32",
              "--model.hidden_size=16", "--model.embed_size=8", "--model.lr=0.01", "--trainer.max_epochs=6", *QUIET)  # fmt: skip
    run_pipeline("autonomous", *common, "--data.categorical_channels=[road]", "--runs_dir", str(tmp_path))
    rmse = json.loads((only_run(tmp_path, "autonomous") / "summary.json").read_text())["test"]["test/rmse"]
    spread = float(table.groupby("sequence")["offset"].first().std())  # 1.27; measured RMSE 0.090
    assert rmse < 0.35 * spread, (rmse, spread)


def covariate_columns(table: pd.DataFrame) -> None:
    table["plan"] = 1.0
    table["road"] = np.where(table.index % 2 == 0, "urban", "rural")
    table["vehicle"] = "car"


with_covariates = table_file("fleet.csv", covariate_columns)
CASES = [
    BadInput("known-channel-not-in-file", (*CSV, "--data.known_future_channels=[plan_typo]"), ("fleet.csv", "'plan_typo' (data.known_future_channels) not found"), with_covariates),
    BadInput("categorical-channel-not-in-file", (*CSV, "--data.categorical_channels=[surface]"), ("fleet.csv", "'surface' (data.categorical_channels) not found"), with_covariates),
    BadInput("group-column-missing", (*CSV, "--data.group_column=fleet", "--data.normalize_by=group"), ("fleet.csv", "'fleet' (data.group_column) not found"), with_covariates),
    BadInput("inf-in-known-channel", (*CSV, "--data.known_future_channels=[plan]"), ("fleet.csv", "'plan'", "inf", "row 17"),
             table_file("fleet.csv", lambda t: (covariate_columns(t), setter(17, "plan", np.inf)(t)))),
    BadInput("normalize-by-group-without-column", (*CSV, "--data.normalize_by=group"), ("--data.normalize_by group needs --data.group_column",), with_covariates),
    BadInput("group-column-without-normalize-by", (*CSV, "--data.group_column=vehicle"), ("--data.group_column 'vehicle'", "add --data.normalize_by group"), with_covariates),
    BadInput("known-channels-for-regression", (*CSV, "--data.task=regression", "--data.target_column=score", "--data.known_future_channels=[plan]"),
             ("--data.known_future_channels ['plan']", "--data.task regression"), with_covariates),
    BadInput("channel-listed-twice", (*CSV, "--data.known_future_channels=[speed]"), ("'speed' is listed in both --data.channels and --data.known_future_channels",), with_covariates),
    BadInput("categories-with-patchtst", (*CSV, "--data.categorical_channels=[road]", "--model.architecture=transformer"),
             ("--data.categorical_channels with --model.architecture transformer", "expected --model.architecture rnn"), with_covariates),
]  # fmt: skip


@pytest.mark.parametrize("case", params(CASES))
def test_bad_covariate_options_are_refused_before_anything_is_written(case, tmp_path, capsys):
    message = check_refused("autonomous", dataclasses.replace(case, expect=()), tmp_path, capsys)
    for expected in case.expect:
        assert contains(message, expected), f"{expected!r} is not in the error message:\n{message}"


def test_a_blank_category_follows_the_nan_rule(tmp_path):
    """A blank road is a missing value: dropped (a gap) or carried forward by ffill/interpolate, counted like a NaN."""
    from domains.autonomous.readers import ColumnSpec, build_tracks, with_origin

    table = fleet(tracks=1, steps=10)
    table["road"] = ["urban"] * 4 + [None] + ["rural"] * 5
    spec = ColumnSpec("sequence", "time", ["speed"], ["x", "y"], categorical=("road",))
    dropped = build_tracks(with_origin(table, "t.csv"), spec, "drop", 0.1)
    filled = build_tracks(with_origin(table, "t.csv"), spec, "interpolate", 0.1)
    assert dropped.report["dropped_rows"] == 1 and dropped.lengths.tolist() == [4, 5]
    assert filled.report["filled_rows"] == 1 and filled.categories[:, 0].tolist() == ["urban"] * 5 + ["rural"] * 5


@pytest.fixture(scope="module")
def covariate_data(tmp_path_factory):
    """A data module with every covariate on 30 planned trips, set up for test."""
    from domains.autonomous.data import SensorSequenceDataModule

    folder = tmp_path_factory.mktemp("autonomous-covariate-data")
    planned_trips(30).to_csv(folder / "trips.csv", index=False)
    dm = SensorSequenceDataModule(path=str(folder / "trips.csv"), channels=["speed"], target_channels=["x", "y"], known_future_channels=["plan"],
                                  categorical_channels=["road"], group_column="vehicle", normalize_by="group", split_column="split",
                                  observe=OBSERVE, predict=PREDICT, batch_size=16)  # fmt: skip
    dm.setup("test")
    return dm


@pytest.mark.parametrize("architecture", ["rnn", "cvae", "mixture"])
def test_every_recurrent_family_reads_covariates_and_its_export_rebuilds_them(architecture, covariate_data):
    """Untrained networks of each family: the future-known values change the forecast, and the exported module
    (raw past, channels, known, codes, group; the first window in an unseen group) gives the prediction path's forecast."""
    from pipelines.domain_registry import get_domain

    dm, spec = covariate_data, get_domain("autonomous")
    model = spec.load_model_class()(architecture=architecture, hidden_size=8, embed_size=4, modes=3, **{t: getattr(dm, s) for s, t in spec.links}).eval()
    raw = next(iter(dm.test_dataloader()))
    raw["group"][0] = len(dm.stats["groups"]["names"])  # the global statistics' row
    export = model.export_spec(dm.state_dict())
    inputs = [raw[name].clone() for name in ("past", "channels", "known", "codes", "group")]
    batch = dm.on_after_batch_transfer(raw, 0)
    with torch.no_grad():
        expected = model._predictions(batch)["single"]
        got = export.module(*inputs)
        changed = model(batch["inputs"], batch["known"] + 1.0)
        assert (changed - model(batch["inputs"], batch["known"])).abs().max() > 1e-4  # the decoder reads the future-known values
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert export.input_names == ["past", "channels", "known", "codes", "group"]


def test_a_group_with_too_few_training_windows_keeps_the_global_statistics_and_is_not_called_unseen():
    from domains.autonomous.group_scaling import fit_group_statistics, group_indices

    rows = np.arange(12).reshape(4, 3)  # four windows of three rows: two of 'a', one of 'b'... and one of 'c'
    groups = np.array(["a", "a", "b", "c"])
    channels = np.arange(12, dtype=np.float32)[:, None] * np.array([[1.0]], dtype=np.float32)
    state, small = fit_group_statistics(np.zeros((12, 2)), channels, None, rows, groups, observe=2, column="vehicle")
    assert state["names"] == ["a"] and small == ["b", "c"] and state["global_only"] == ["b", "c"]
    assert state["channel_mean"] == [[np.mean([0, 1, 3, 4])]]  # the observed rows (2 of 3) of a's two windows
    index, unseen = group_indices(np.array(["a", "b", "bus"]), state)
    assert index.tolist() == [0, 1, 1] and dict(unseen) == {"bus": 1}  # 'b' uses the global row (1) but was seen
