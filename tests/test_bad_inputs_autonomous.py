"""Bad inputs a driving team will try, through the real runner: each is refused with exit status 2
and one paragraph naming the file, row, column or option (tests/bad_inputs.py), before anything is
written. Tables are tiny (6 trips of 24 rows at 10 Hz, tests/autonomous_fleet.py); nothing trains here: the
``predict`` cases score new files with the run trained once on them (``autonomous_fleet_run``, tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from domains.autonomous.data import SensorSequenceDataModule
from tests.bad_inputs import BadInput, check_refused, folder_digests, params
from tests.autonomous_fleet import BASE, DT, fleet, write
from tests.conftest import ROOT, run_pipeline


def table_file(name: str, change=None, **fleet_options):
    """A ``make`` that writes ``fleet()`` (changed in place by ``change``) as ``name``."""

    def make(folder: Path) -> None:
        table = fleet(**fleet_options)
        if change is not None:
            change(table)
        write(table, folder / name)

    return make


def setter(row: int, column: str, value) -> callable:
    """Set the 1-based data ``row`` of ``column`` (the object dtype lets text into a number column)."""

    def change(table: pd.DataFrame) -> None:
        if isinstance(value, str):
            table[column] = table[column].astype(object)
        table.loc[row - 1, column] = value

    return change


def alternating(table: pd.DataFrame) -> None:
    """Steps of 0.07 and 0.13 s in turn: 0.1 s on average, never 0.1 s."""
    k = np.round(table["time"] / DT).astype(int)
    table["time"] = np.round(k * DT - 0.03 * (k % 2), 6)


def milliseconds(table: pd.DataFrame) -> None:
    table.loc[table["sequence"] == "trip2", "time"] *= 1000


def late_step(table: pd.DataFrame) -> None:
    """trip1 steps 0.15 s from its 10th to its 11th row (rows 34 and 35), 0.1 s elsewhere."""
    table.loc[(table["sequence"] == "trip1") & (table.index >= 34), "time"] += 0.05


def swapped(table: pd.DataFrame) -> None:
    """Rows 11 and 12 (trip0 at 1.0 and 1.1 s) in the wrong order: time goes back at row 12."""
    table.loc[[10, 11], "time"] = [1.1, 1.0]


def stamped(table: pd.DataFrame) -> None:
    """The time column as ISO 8601 text (2024-05-01T13:45:00.100, ...), as a CSV export of a datetime column."""
    table["time"] = (pd.Timestamp("2024-05-01 13:45") + pd.to_timedelta(np.round(table["time"] * 1000), unit="ms")).dt.strftime("%Y-%m-%dT%H:%M:%S.%f")


def write_eth(folder: Path, bad: bool = True) -> None:
    """An ETH/UCY layout (scene ``alpha`` held out): rows ``frame ped x y``, frame step 10."""
    for split, peds in (("train", 4), ("val", 2), ("test", 2)):
        (folder / "eth" / "alpha" / split).mkdir(parents=True)
        rows = [(10 * f, p, 0.4 * f + p, 0.1 * p) for f in range(24) for p in range(peds)]
        lines = [f"{f:.1f}\t{p:.1f}\t{x:.3f}\t{y:.3f}" for f, p, x, y in rows]
        if bad and split == "train":
            lines[2] = lines[2].rsplit("\t", 2)[0] + "\tinf\t0.0"  # row 3, column x
        (folder / "eth" / "alpha" / split / f"beta_{split}.txt").write_text("\n".join(lines) + "\n")


CSV = ("--data.path={tmp}/fleet.csv", *BASE)
ETH = ("--config", str(ROOT / "domains/autonomous/configs/eth_ucy.yaml"), "--data.eth_ucy_root={tmp}/eth", "--data.eth_ucy_scene=alpha",
       "--data.batch_size=8", "--model.hidden_size=8", "--model.embed_size=4", "--trainer.max_epochs=1", "--trainer.logger=false")  # fmt: skip

CASES = [
    # non-finite values: every format, every role (channel, position, time, target), ETH/UCY
    BadInput("inf-channel-csv", CSV, ("fleet.csv", "'speed'", "inf", "row 30"), table_file("fleet.csv", setter(30, "speed", np.inf))),
    BadInput("minus-inf-position-tsv", ("--data.path={tmp}/fleet.tsv", *BASE), ("fleet.tsv", "'x'", "inf", "row 5"),
             table_file("fleet.tsv", setter(5, "x", -np.inf))),  # fmt: skip
    BadInput("float32-overflow-parquet", ("--data.path={tmp}/fleet.parquet", *BASE), ("fleet.parquet", "'y'", "float32", "row 7"),
             table_file("fleet.parquet", setter(7, "y", 1e39))),  # fmt: skip
    # an empty id crashed in the split (TypeError comparing float and str) with exit 1
    BadInput("missing-sequence-id", CSV, ("fleet.csv", "row 21", "'sequence'", "missing"), table_file("fleet.csv", setter(21, "sequence", None))),
    BadInput("inf-time", CSV, ("fleet.csv", "'time'", "inf", "row 10"), table_file("fleet.csv", setter(10, "time", np.inf))),
    BadInput("inf-regression-target", (*CSV, "--data.task=regression", "--data.target_column=score"), ("fleet.csv", "'score'", "inf", "row 12"),
             table_file("fleet.csv", setter(12, "score", np.inf))),  # fmt: skip
    BadInput("inf-eth-ucy", ETH, ("beta_train.txt", "'x'", "inf", "row 3"), write_eth),
    # sampling rate: one step for the data set, jitter, another time unit
    BadInput("alternating-steps", CSV, ("fleet.csv", "track 'trip", "a step of 0.13", "expected 0.07", "--data.time_jitter"), table_file("fleet.csv", alternating)),
    BadInput("alternating-steps-declared", (*CSV, "--data.time_step=0.1"), ("fleet.csv", "is sampled every 0.07", "time step is 0.1"),
             table_file("fleet.csv", alternating)),  # fmt: skip
    BadInput("trip-in-milliseconds", CSV, ("fleet.csv", "track 'trip2'", "rows 49 to 72", "sampled every 100", "time step is 0.1", "time unit"),
             table_file("fleet.csv", milliseconds)),  # fmt: skip
    BadInput("step-neither-regular-nor-gap", CSV, ("fleet.csv", "track 'trip1'", "a step of 0.15", "row 35", "--data.max_gap"),
             table_file("fleet.csv", late_step)),  # fmt: skip
    BadInput("iso-time-with-a-garbled-row", CSV, ("fleet.csv row 30", "'time'", "'2024-05-01T13:45:0x'", "iso 8601"),
             table_file("fleet.csv", lambda t: (stamped(t), setter(30, "time", "2024-05-01T13:45:0x")(t)))),  # fmt: skip
    BadInput("iso-time-mixed-with-numbers", CSV, ("fleet.csv row 2", "'time'", "'0.1'", "every time as a number", "or every time as iso 8601"),
             table_file("fleet.csv", lambda t: (stamped(t), setter(2, "time", "0.1")(t)))),  # fmt: skip
    # one trip written in UTC with Z among trips without a zone (read as UTC): silently shifted by the offset before
    BadInput("iso-time-mixing-zones", CSV, ("fleet.csv row 121", "'time'", "a time with a time zone", "fleet.csv row 1 one without", "write every time"),
             table_file("fleet.csv", lambda t: (stamped(t), t.__setitem__("time", np.where(t["sequence"] == "trip5", t["time"] + "+02:00", t["time"]))))),  # fmt: skip
    BadInput("time-step-negative", (*CSV, "--data.time_step=-0.1"), ("--data.time_step must be a positive number",), table_file("fleet.csv")),
    BadInput("time-jitter-too-large", (*CSV, "--data.time_jitter=0.7"), ("--data.time_jitter must be in [0, 0.5)",), table_file("fleet.csv")),
    # columns, values, rows
    BadInput("missing-column", CSV, ("fleet.csv", "'speed' (data.channels) not found"), table_file("fleet.csv", lambda t: t.drop(columns="speed", inplace=True))),
    BadInput("text-in-channel", CSV, ("fleet.csv row 9", "'speed'", "'fast' is not numeric"), table_file("fleet.csv", setter(9, "speed", "fast"))),
    BadInput("duplicate-time", CSV, ("fleet.csv rows 40 and 41", "duplicate (sequence, time) = ('trip1', 1.5)"),
             table_file("fleet.csv", setter(41, "time", 1.5))),  # fmt: skip
    BadInput("unsorted-time", CSV, ("fleet.csv row 12", "sequence 'trip0'", "must be sorted"), table_file("fleet.csv", swapped)),
    BadInput("duplicate-header", CSV, ("fleet.csv", "column 'x' 2 times"), lambda f: (f / "fleet.csv").write_text("sequence,time,x,y,speed,x\na,0,1,2,3,4\n")),
    BadInput("no-track-long-enough", CSV, ("no track is long enough", "observe + predict = 20 rows", "all 6 tracks", "longest segment has 10 rows"),
             table_file("fleet.csv", steps=10)),  # fmt: skip
    # a channel blank in every row: the NaN rule dropped every row and the refusal blamed the track lengths and time gaps
    BadInput("channel-empty-in-every-row", CSV, ("fleet.csv", "column 'speed' (--data.channels)", "no value in any of the", "split 'train'"),
             table_file("fleet.csv", lambda t: t.__setitem__("speed", np.nan))),  # fmt: skip
    # a regression window is the observed rows only: the refusal said "observe + predict"
    BadInput("no-track-long-enough-regression", (*CSV, "--data.task=regression", "--data.target_column=score"),
             ("no track is long enough", "observe = 8 rows (--data.observe 8)", "longest segment has 6 rows"), table_file("fleet.csv", steps=6)),  # fmt: skip
    BadInput("observe-zero", (*CSV, "--data.observe=0"), ("--data.observe must be at least 2",), table_file("fleet.csv")),
    BadInput("predict-negative", (*CSV, "--data.predict=-3"), ("--data.predict must be at least 1",), table_file("fleet.csv")),
    BadInput("bad-split-value", (*CSV, "--data.split_column=split"), ("fleet.csv row 6", "'split'", "'holdout'", "expected train, val or test"),
             table_file("fleet.csv", lambda t: t.__setitem__("split", np.where(t.index == 5, "holdout", np.where(t.index < 72, "train", "val"))))),  # fmt: skip
    # files
    BadInput("semicolon-separated", CSV, ("fleet.csv", "looks ';'-separated", "expected ','-separated"), lambda f: fleet().to_csv(f / "fleet.csv", index=False, sep=";")),
    BadInput("latin-1-label", CSV, ("fleet.csv", "line 32 (data row 31)", "'manoeuvre'", "not utf-8"),
             lambda f: (f / "fleet.csv").write_bytes(fleet().assign(manoeuvre=lambda t: np.where(t.index == 30, "freiné", t["manoeuvre"])).to_csv(index=False).encode("latin-1"))),  # fmt: skip
    BadInput("cut-short", CSV, ("fleet.csv", "has 4 values but the header has 7 columns", "cut short"),
             lambda f: (f / "fleet.csv").write_text(fleet().to_csv(index=False).rstrip("\n").rsplit(",", 3)[0])),  # the last line cut after 4 values
    BadInput("empty-file", CSV, ("fleet.csv", "empty (0 bytes)"), lambda f: (f / "fleet.csv").write_bytes(b"")),
    BadInput("header-only", CSV, ("fleet.csv", "no data rows"), lambda f: (f / "fleet.csv").write_text("sequence,time,x,y,speed\n")),
    BadInput("unknown-extension", ("--data.path={tmp}/fleet.xlsx", *BASE), ("fleet.xlsx", "unsupported table format '.xlsx'"),
             lambda f: (f / "fleet.xlsx").write_bytes(b"PK\x03\x04")),  # fmt: skip
    BadInput("file-not-found", ("--data.path={tmp}/nowhere.csv", *BASE), ("nowhere.csv", "file not found")),
    # classification labels
    BadInput("label-typo", (*CSV, "--data.task=classification", "--data.target_column=manoeuvre"), ("'manoeuvre'", "'brake'", "'brkae' (24 rows, first at", "fleet.csv row 121)", "spelt two ways"),
             table_file("fleet.csv", lambda t: t.__setitem__("manoeuvre", np.where(t["sequence"] == "trip5", "brkae", t["manoeuvre"])))),  # fmt: skip
    BadInput("label-not-declared", (*CSV, "--data.task=classification", "--data.target_column=manoeuvre", "--data.class_names=[keep,brake]"),
             ("'brakes' (24 rows, first at", "fleet.csv row 73)", "not one of the declared classes", "did you mean 'brake'"),
             table_file("fleet.csv", lambda t: t.__setitem__("manoeuvre", np.where(t["sequence"] == "trip3", "brakes", t["manoeuvre"])))),  # fmt: skip
    # a class only the test split has: the refusal named no file or row and blamed class_names the user never gave
    BadInput("class-only-in-the-test-split", (*CSV, "--data.task=classification", "--data.target_column=manoeuvre", "--data.split_column=split"),
             ("fleet.csv row 121", "'reverse'", "split 'test'", "classes were learnt from it", "--data.class_names"),
             table_file("fleet.csv", lambda t: (t.__setitem__("split", np.where(t["sequence"] == "trip5", "test", np.where(t["sequence"] == "trip4", "val", "train"))),
                                                t.__setitem__("manoeuvre", np.where(t["sequence"] == "trip5", "reverse", t["manoeuvre"]))))),  # fmt: skip
    # a class listed twice was accepted silently (two outputs for one class, one never the target)
    BadInput("class-declared-twice", (*CSV, "--data.task=classification", "--data.target_column=manoeuvre", "--data.class_names=[keep,brake,keep]"),
             ("--data.class_names", "'keep'", "twice"), table_file("fleet.csv")),  # fmt: skip
    BadInput("class-declared-twice-in-another-case", (*CSV, "--data.task=classification", "--data.target_column=manoeuvre",
             "--data.class_names=[brake,keep,Keep]"), ("--data.class_names", "'keep' and 'Keep'", "differ only in case or spaces"), table_file("fleet.csv")),  # fmt: skip
]


def contains(message: str, expected: str) -> bool:
    """``expected`` in the error paragraph, case and line wrapping ignored (it is wrapped at 100
    columns, anywhere in a long file path)."""
    return "".join(expected.lower().split()) in "".join(message.lower().split())


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input_is_refused(case, tmp_path, capsys):
    message = check_refused("autonomous", dataclasses.replace(case, expect=()), tmp_path, capsys)
    for expected in case.expect:
        assert contains(message, expected), f"{expected!r} is not in the error message:\n{message}"


# ----- what must pass: jitter within the tolerance, gaps, the step of the whole data set -------
def test_small_jitter_is_one_time_step_for_every_split_and_gaps_split_tracks(tmp_path):
    table = fleet(tracks=8, steps=30)
    rng = np.random.default_rng(0)
    table["time"] = np.round(table["time"] + rng.uniform(-0.003, 0.003, len(table)), 6)  # +-3 ms: steps 0.094 to 0.106 s
    table = table.drop(index=[40, 41])  # trip1 misses two samples (a 0.3 s gap): split in two
    write(table, tmp_path / "fleet.csv")
    dm = SensorSequenceDataModule(path=str(tmp_path / "fleet.csv"), channels=["speed"], target_channels=["x", "y"], observe=4, predict=4)
    dm.setup("fit")
    steps = {name: tracks.report["time_step"] for name, tracks in dm.tracks.items()}
    assert len(set(steps.values())) == 1 and abs(dm.time_step - DT) < 0.002, steps
    assert sum(tracks.report["gaps"] for tracks in dm.tracks.values()) == 1
    assert all(len(dataset) for dataset in dm.datasets.values())


def test_datetime_time_columns_are_seconds_in_parquet_and_iso_csv_alike(tmp_path):
    """A Parquet datetime column (microseconds, or zoned) and its CSV export as ISO 8601 text give the
    times in seconds: the 0.1 s step (declared or inferred) and the windows of the numeric-seconds file."""
    numeric = fleet()
    write(numeric, tmp_path / "seconds.csv")
    text = fleet()
    stamped(text)
    write(text, tmp_path / "iso.csv")
    dated = numeric.assign(time=pd.to_datetime(text["time"]).astype("datetime64[us]"))
    write(dated, tmp_path / "dated.parquet")
    write(dated.assign(time=dated["time"].dt.tz_localize("Europe/Paris")), tmp_path / "zoned.parquet")
    options = {"channels": ["speed"], "target_channels": ["x", "y"], "observe": 4, "predict": 4}
    reference = SensorSequenceDataModule(path=str(tmp_path / "seconds.csv"), **options)
    reference.setup("fit")
    for name in ("iso.csv", "dated.parquet", "zoned.parquet"):
        for declared in (None, 0.1):
            dm = SensorSequenceDataModule(path=str(tmp_path / name), time_step=declared, **options)
            dm.setup("fit")
            assert dm.time_step == pytest.approx(DT, abs=1e-6), (name, dm.time_step)
            for split, tracks in dm.tracks.items():
                base = reference.tracks[split]
                assert tracks.names == base.names and tracks.lengths.tolist() == base.lengths.tolist(), (name, split)
                np.testing.assert_allclose(np.diff(tracks.time), np.diff(base.time), atol=1e-6)
                np.testing.assert_array_equal(tracks.targets, base.targets)
                assert len(dm.datasets[split]) == len(reference.datasets[split])
    start = pd.Timestamp("2024-05-01 13:45", tz="UTC").timestamp()
    dm = SensorSequenceDataModule(path=str(tmp_path / "dated.parquet"), **options)
    assert dm.tracks["train"].time.min() >= start and dm.tracks["train"].time.max() < start + 3  # seconds since 1970 (UTC)


# ----- predict files: scored with a trained run, refused before anything is written --------------
PREDICT_CASES = [
    ("inf.csv", setter(5, "speed", np.inf), ("inf.csv", "'speed'", "inf", "row 5")),
    ("overflow.parquet", setter(30, "x", -1e39), ("overflow.parquet", "'x'", "float32", "row 30")),
    ("milliseconds.csv", milliseconds, ("milliseconds.csv", "track 'trip2'", "sampled every 100", "time step is 0.1", "saved in the checkpoint")),
    ("alternating.csv", alternating, ("alternating.csv", "sampled every 0.07", "time step is 0.1")),
    ("text.tsv", setter(3, "y", "n/a?"), ("text.tsv row 3", "'y'", "not numeric")),
]


@pytest.mark.parametrize(("name", "change", "expect"), PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_bad_predict_file_is_refused_and_the_run_is_left_as_it_was(autonomous_fleet_run, tmp_path, capsys, name, change, expect):
    folder, runs, run = autonomous_fleet_run
    table = fleet()
    change(table)
    write(table, tmp_path / name)
    before = folder_digests(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline("autonomous", "predict", "--run_id", run.name, "--ckpt_path", "best", f"--data.predict_path={tmp_path / name}", "--runs_dir", str(runs))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    message = err[err.index("error:") :]
    assert "Traceback" not in err
    for expected in expect:
        assert contains(message, expected), f"{expected!r} is not in:\n{message}"
    assert folder_digests(run) == before, "the run folder changed"
    assert not list(run.glob("predictions*"))


def test_time_step_is_saved_in_the_checkpoint_and_checked_when_scoring(autonomous_fleet_run, tmp_path, capsys):
    """The checkpoint holds the step (fitted state); scoring data at another rate is refused against it
    even when the configured training table agrees with the scoring data (here: the same trips every
    0.2 s; ``predict`` does not read it), with exit status 2."""
    folder, runs, run = autonomous_fleet_run
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["SensorSequenceDataModule"]
    assert state["time_step"] == pytest.approx(DT)
    write(fleet(dt=0.2), tmp_path / "slow.csv")
    before = folder_digests(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline("autonomous", "predict", "--run_id", run.name, "--ckpt_path", "best", f"--data.path={tmp_path / 'slow.csv'}",
                     f"--data.predict_path={tmp_path / 'slow.csv'}", "--runs_dir", str(runs))  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    # the scoring file is checked against the checkpoint's step (the training table is not read for predict)
    assert contains(err, "slow.csv: track 'trip0'") and contains(err, "is sampled every 0.2") and contains(err, "time step is 0.1"), err[-1500:]
    assert contains(err, "saved in the checkpoint"), err[-1500:]
    after = folder_digests(run)
    # refused when Lightning loads the checkpoint: the invocation is already in provenance.json and the
    # lock file (the runner hands the checkpoint's state to the data module only then); the rest is intact
    kept = {name: digest for name, digest in before.items() if name not in ("provenance.json", ".lock")}
    assert {name: after.get(name) for name in kept} == kept, "the run's checkpoints or config changed"
    assert not list(run.glob("predictions*")), sorted(set(after) - set(before))


def test_utm_sized_positions_forecast_as_the_same_data_at_the_origin(autonomous_fleet_run, tmp_path):
    """Positions near (500 000 m, 5 000 000 m), as UTM writes them, are centred in float64 before the
    float32 cast: the checkpoint forecasts them as the same trips at the origin, shifted, to the
    millimetre, in ``predict`` and in the served bundle (in float32 they would move in 0.5 m steps)."""
    from pipelines.bundle_runtime import Bundle
    from pipelines.export import export_checkpoint
    from pipelines.domain_registry import get_domain
    from pipelines.serving_requests import load_adapters

    folder, runs, run = autonomous_fleet_run
    shift = {"x": 500_000.0, "y": 5_000_000.0}
    plain, far = fleet(), fleet()
    for column, offset in shift.items():
        far[column] = far[column] + offset
    write(plain, tmp_path / "plain.csv")
    write(far, tmp_path / "utm.csv")
    for name in ("plain", "utm"):
        run_pipeline("autonomous", "predict", "--run_id", run.name, "--ckpt_path", "best", f"--data.predict_path={tmp_path / name}.csv",
                     "--output", f"{name}.csv", "--runs_dir", str(runs), "--trainer.logger=false")  # fmt: skip
    near, utm = pd.read_csv(run / "plain.csv"), pd.read_csv(run / "utm.csv")
    forecast = [c for c in near.columns if c.startswith(("pred_", "true_"))]
    assert forecast and len(near) == len(utm)
    for column in forecast:
        offset = shift[column.split("_")[1]]
        np.testing.assert_allclose(utm[column] - offset, near[column], atol=1e-3, err_msg=column)

    bundle = Bundle(export_checkpoint(get_domain("autonomous"), run / "checkpoints" / "best.ckpt", "onnx", tmp_path / "bundle"))
    adapter = load_adapters(bundle.metadata)[0]
    observe = int(bundle.metadata["domain_metadata"]["observe"])

    def served(table: pd.DataFrame) -> list[dict]:
        rows = [{"x": float(r.x), "y": float(r.y), "speed": float(r.speed)} for r in table.head(observe).itertuples()]
        return adapter.encode(adapter.infer(adapter.decode({"observations": rows}), bundle.run))["forecast"]

    for at_origin, at_utm in zip(served(plain), served(far)):
        assert at_utm["x"] - shift["x"] == pytest.approx(at_origin["x"], abs=1e-3) and at_utm["y"] - shift["y"] == pytest.approx(at_origin["y"], abs=1e-3)
