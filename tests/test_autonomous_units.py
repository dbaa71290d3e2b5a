"""Positions in another length unit: one trip in millimetres among trips in metres, or a whole file in
millimetres scored by a model trained in metres (``domains/autonomous/position_units.py``).

Refused with exit status 2 at ``fit`` (any split, against the training split's step scale), at ``test``
and ``predict`` (against the checkpoint's) and with a 422 by the server (against the bundle's), before
anything is written; checkpoints and bundles from before the scale was saved carry none and are not
checked. The shipped ETH/UCY folds pass. Tables are tiny (6 straight trips of 24 rows at 10 Hz, 1.5 m
per step); the scoring tests use the run trained once on it (``autonomous_fleet_run``, tests/conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from domains.autonomous.data import SensorSequenceDataModule
from domains.autonomous.position_units import KEY, TOO_FAR, TOO_NEAR, unit_hint
from domains.autonomous.readers import ETH_UCY_SCENES
from tests.bad_inputs import BadInput, check_refused, folder_digests, params
from tests.conftest import only_run, run_pipeline, shared_file
from tests.test_bad_inputs_autonomous import BASE, CSV, contains, fleet, table_file, write


def in_unit(trip: str | None, factor: float):
    """Multiply the positions of ``trip`` (every trip: ``None``) by ``factor``: 1000 writes metres as millimetres."""

    def change(table) -> None:
        rows = table["sequence"] == trip if trip else slice(None)
        table.loc[rows, ["x", "y"]] *= factor

    return change


def gps_jump(trip: str, metres: float):
    """Offset the positions of ``trip`` from its 13th row on by ``metres`` in x: one long step (a GPS glitch)."""

    def change(table) -> None:
        rows = (table["sequence"] == trip) & (table["time"] >= 1.2 - 1e-9)
        table.loc[rows, "x"] += metres

    return change


def looped(trip: str, factor: float):
    """Make ``trip`` a closed loop (it ends where it started) of about 1.5 m steps, times ``factor``."""

    def change(table) -> None:
        rows = table["sequence"] == trip
        angle = np.linspace(0, 2 * np.pi, int(rows.sum()))
        radius = 1.5 * (len(angle) - 1) / (2 * np.pi)
        table.loc[rows, "x"] = radius * np.cos(angle) * factor
        table.loc[rows, "y"] = radius * np.sin(angle) * factor

    return change


def mixed_traffic(table) -> None:
    """Walkers at 0.6 m/s (0.06 m per 0.1 s step) and cars at 33 m/s in trip1 (train) and trip3 (val): 55 times apart."""
    cars = table["sequence"].isin(["trip1", "trip3"])
    table.loc[~cars, ["x", "y"]] *= 0.04
    table.loc[cars, ["x", "y"]] *= 2.2


# the random split of the 6 trips: train trip0, trip1, trip4, trip5; val trip3; test trip2 (rows 49 to 72)
FIT_CASES = [
    BadInput("trip-in-millimetres-in-train", CSV, ("fleet.csv: track 'trip1' (rows 25 to 48, train split)", "moves 1503", "times as far",
             "the training split's moving tracks): ", "millimetres among metres", "divide them by 1000"), table_file("fleet.csv", in_unit("trip1", 1000))),  # fmt: skip
    BadInput("trip-in-millimetres-in-test", CSV, ("fleet.csv: track 'trip2' (rows 49 to 72, test split)", "millimetres among metres"),
             table_file("fleet.csv", in_unit("trip2", 1000))),  # fmt: skip
    BadInput("trip-in-millimetres-looping", CSV, ("fleet.csv: track 'trip1' (rows 25 to 48, train split)", "millimetres among metres",
             "divide them by 1000"), table_file("fleet.csv", looped("trip1", 1000))),  # a round trip: not directed, still judged  # fmt: skip
    BadInput("trip-in-kilometres", CSV, ("track 'trip4'", "moves 0.0015", "kilometres among metres", "multiply them by 1000"),
             table_file("fleet.csv", in_unit("trip4", 0.001))),  # fmt: skip
]


@pytest.mark.parametrize("case", params(FIT_CASES))
def test_a_trip_in_another_length_unit_is_refused_at_fit(case, tmp_path, capsys):
    check_refused("autonomous", case, tmp_path, capsys)


def test_real_speed_differences_pass(tmp_path):
    """A trip 30 times as fast (a car among walkers) and a parked one with position noise are real data: no refusal."""
    table = fleet()
    in_unit("trip1", 30)(table)
    parked = table["sequence"] == "trip4"
    noise = np.random.default_rng(0).normal(0, 0.02, (int(parked.sum()), 2))
    table.loc[parked, ["x", "y"]] = np.array([4.0, 2.0]) + noise
    write(table, tmp_path / "fleet.csv")
    dm = SensorSequenceDataModule(path=str(tmp_path / "fleet.csv"), channels=["speed"], target_channels=["x", "y"], observe=4, predict=4)
    dm.setup("fit")
    assert dm.stats[KEY] == pytest.approx(1.5, rel=0.1)
    assert TOO_NEAR < 1 / 30 and TOO_FAR > 30
    assert TOO_FAR <= 1000 / 3 and "far outside the real spread" in unit_hint(TOO_FAR) and "among" not in unit_hint(TOO_FAR)  # no unit below ~x316


@pytest.mark.parametrize(("change", "scale"), [
    (gps_jump("trip1", 600.0), 1.5),  # one 600 m step covers most of trip1's path: its typical step is 400 times the scale, its median step is not
    (mixed_traffic, 0.06),  # cars 55 times as fast as the median walker: a real speed
    (in_unit("trip1", 100), 1.5),  # centimetres among metres (x100) is inside the real spread of speeds: not caught (module docstring)
], ids=["gps-jump", "walkers-and-cars", "centimetres-not-caught"])  # fmt: skip
def test_real_glitches_and_speed_spreads_train(tmp_path, change, scale):
    table = fleet()
    change(table)
    write(table, tmp_path / "fleet.csv")
    runs = tmp_path / "runs"
    run_pipeline("autonomous", "fit", f"--data.path={tmp_path / 'fleet.csv'}", *BASE, "--data.observe=4", "--data.predict=4", "--runs_dir", str(runs))
    checkpoint = torch.load(only_run(runs, "autonomous") / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["SensorSequenceDataModule"][KEY] == pytest.approx(scale, rel=0.1)


# ----- test, predict and serving: against the checkpoint's scale --------------------------------
def refused(run, runs, capsys, *args: str) -> str:
    """Run a command on ``run``: exit 2, no traceback, its checkpoints and config untouched, no predictions; the error paragraph."""
    before = folder_digests(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline("autonomous", *args, "--run_id", run.name, "--ckpt_path", "best", "--runs_dir", str(runs))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err[-3000:]
    after = folder_digests(run)
    kept = {name: digest for name, digest in before.items() if name not in ("provenance.json", ".lock")}  # the invocation is recorded
    assert {name: after.get(name) for name in kept} == kept and not list(run.glob("predictions*")), sorted(set(after) - set(before))
    return err[err.index("error:") :]


@pytest.mark.parametrize(("factor", "expect"), [(1000, "millimetres among metres"), (0.001, "kilometres among metres")])
def test_predict_on_a_file_in_another_unit_is_refused_against_the_checkpoint(autonomous_fleet_run, tmp_path, capsys, factor, expect):
    folder, runs, run = autonomous_fleet_run
    assert torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["SensorSequenceDataModule"][KEY] == pytest.approx(1.5, rel=0.05)
    table = fleet()
    in_unit(None, factor)(table)
    write(table, tmp_path / "scaled.csv")
    message = refused(run, runs, capsys, "predict", f"--data.predict_path={tmp_path / 'scaled.csv'}")
    for expected in ("scaled.csv: track 'trip0' (rows 1 to 24, predict split)", "saved in the checkpoint", "times as far", expect):
        assert contains(message, expected), f"{expected!r} is not in:\n{message}"


def test_test_on_a_table_in_millimetres_is_refused_against_the_checkpoint(autonomous_fleet_run, tmp_path, capsys):
    folder, runs, run = autonomous_fleet_run
    table = fleet()
    in_unit(None, 1000)(table)  # every trip: its own training scale would agree, the checkpoint's does not
    write(table, tmp_path / "mm.csv")
    message = refused(run, runs, capsys, "test", f"--data.path={tmp_path / 'mm.csv'}")
    assert contains(message, "mm.csv: track") and contains(message, "saved in the checkpoint") and contains(message, "millimetres among metres"), message


def test_a_checkpoint_without_the_scale_still_scores_unchecked(autonomous_fleet_run, tmp_path):
    folder, runs, run = autonomous_fleet_run
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    del checkpoint["SensorSequenceDataModule"][KEY]
    torch.save(checkpoint, run / "checkpoints" / "before-the-scale.ckpt")
    table = fleet()
    in_unit(None, 1000)(table)
    write(table, tmp_path / "mm.csv")
    run_pipeline("autonomous", "predict", "--run_id", run.name, "--ckpt_path", str(run / "checkpoints" / "before-the-scale.ckpt"),
                 f"--data.predict_path={tmp_path / 'mm.csv'}", "--output", "old.csv", "--runs_dir", str(runs), "--trainer.logger=false")  # fmt: skip
    assert (run / "old.csv").exists()


def test_served_positions_in_another_unit_get_422(autonomous_fleet_run, tmp_path):
    from fastapi import HTTPException

    from pipelines.bundle_runtime import Bundle
    from pipelines.domain_registry import get_domain
    from pipelines.export import export_checkpoint
    from pipelines.serving_requests import load_adapters

    folder, runs, run = autonomous_fleet_run
    bundle = Bundle(export_checkpoint(get_domain("autonomous"), run / "checkpoints" / "best.ckpt", "onnx", tmp_path / "bundle"))
    assert bundle.metadata["domain_metadata"][KEY] == pytest.approx(1.5, rel=0.05)
    adapter = load_adapters(bundle.metadata)[0]
    table = fleet().head(4)

    def request(factor: float) -> dict:
        return {"observations": [{"x": float(r.x) * factor, "y": float(r.y) * factor, "speed": float(r.speed)} for r in table.itertuples()]}

    assert len(adapter.encode(adapter.infer(adapter.decode(request(1.0)), bundle.run))["forecast"]) == 4
    glitch = request(1.0)
    glitch["observations"][-1]["x"] += 600.0  # one GPS jump: the typical step is 400 times the scale, the median step is not
    adapter.decode(glitch)
    for factor, expect in ((1000, "millimetres among metres"), (0.001, "kilometres among metres")):
        with pytest.raises(HTTPException) as refusal:
            adapter.decode(request(factor))
        assert refusal.value.status_code == 422, refusal.value.detail
        assert refusal.value.detail.startswith("observations: the positions ['x', 'y']") and expect in refusal.value.detail, refusal.value.detail
    older = json.loads(json.dumps(bundle.metadata))
    del older["domain_metadata"][KEY]  # a bundle exported before the scale was recorded: served unchecked
    load_adapters(older)[0].decode(request(1000))


# ----- the shipped data: every ETH/UCY fold passes ---------------------------------------------
@pytest.mark.parametrize("scene", ETH_UCY_SCENES)
def test_every_shipped_eth_ucy_fold_passes(scene):
    root = shared_file("autonomous/eth_ucy")
    dm = SensorSequenceDataModule(eth_ucy_root=str(root), eth_ucy_scene=scene, target_channels=["x", "y"], channels=[], observe=8, predict=12)
    dm.setup("fit")  # every split against the training split's scale
    assert 0.3 < dm.stats[KEY] < 0.8, dm.stats[KEY]  # metres per 0.4 s step of walking pedestrians
