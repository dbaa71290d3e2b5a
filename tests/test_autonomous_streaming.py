"""Autonomous ``--data.streaming true``: a long table read in chunks into a memory-mapped cache
(domains/autonomous/streaming.py) gives what the in-memory path gives: the same tracks, windows,
fitted statistics, drift reference and items under every split rule and format, the same training
losses and predictions; a damaged cache is rebuilt; bad input is refused as before (exit 2, file, row,
column, nothing written); a table whose sequences interleave is refused. Also: both Parquet chunk readers (autonomous,
finance scoring) hold one row group at a time."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported at collection, as in tests/test_bad_inputs_autonomous.py)
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from domains.autonomous.data import SensorSequenceDataModule
from domains.autonomous.simulator import simulate_vehicles
from tests.bad_inputs import BadInput, check_refused, params
from tests.conftest import only_run, read_jsonl, run_pipeline, run_pipeline_process
from tests.test_bad_inputs_autonomous import BASE, CASES, contains, table_file

CHANNELS = ["speed", "yaw_rate", "accel_long", "accel_lat"]
RULES = {
    "random-forecasting": {},
    "hash-regression-ffill": {"split_by": "hash", "task": "regression", "target_column": "aggressiveness", "nan_policy": "ffill", "predict": 1},
    "column-drop": {"split_column": "fold", "nan_policy": "drop"},
    "time-cutoffs": {"split_by": "time", "val_after": "5.5", "test_after": "7.5", "observe": 4, "predict": 3},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """36 simulated vehicles (NaN rows from sensor dropouts, a time gap in one) as CSV, TSV and Parquet."""
    folder = tmp_path_factory.mktemp("streaming")
    frame = simulate_vehicles(36, 40, 0.25, 0, 0.02)
    frame = frame.drop(index=[100, 101, 102]).reset_index(drop=True)  # veh0002 misses 3 samples: split in two segments
    frame["fold"] = np.array(["train", "train", "train", "val", "test"])[frame["sequence"].str[3:].astype(int) % 5]
    frame.to_csv(folder / "t.csv", index=False)
    frame.to_csv(folder / "t.tsv", index=False, sep="\t")
    frame.to_parquet(folder / "t.parquet", index=False, row_group_size=100)
    return folder


def both(path: Path, cache: Path, chunk_rows: int = 37, **options) -> tuple[SensorSequenceDataModule, SensorSequenceDataModule]:
    """The in-memory data module and the streaming one (chunks of 37 rows: a sequence spans several)."""
    options = {"channels": CHANNELS, "target_channels": ["x", "y"], "stride": 2, "nan_policy": "interpolate", "observe": 6, "predict": 4, **options}
    return (SensorSequenceDataModule(path=str(path), **options),
            SensorSequenceDataModule(path=str(path), streaming=True, cache_dir=str(cache), chunk_rows=chunk_rows, **options))  # fmt: skip


def assert_same_items(a, b, split: str) -> None:
    assert len(a) == len(b), split
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys() and a.names[i] == b.names[i], (split, i)
        for key, value in x.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == y[key].dtype and value.shape == y[key].shape and torch.equal(value, y[key]), (split, i, key)
            else:
                assert value == y[key], (split, i, key)


@pytest.mark.parametrize(("name", "rule"), [("t.csv", "random-forecasting"), ("t.parquet", "hash-regression-ffill"), ("t.tsv", "column-drop"), ("t.csv", "time-cutoffs")])
def test_streaming_gives_the_same_tracks_statistics_reference_and_items(files, tmp_path, name, rule):
    memory, streamed = both(files / name, tmp_path / "cache", **RULES[rule])
    memory.setup("fit"), streamed.setup("fit")
    assert streamed.stats == memory.stats  # scaling, displacement scale, target moments, time step, drift reference: exactly
    for split in ("train", "val", "test"):
        a, b = memory.tracks[split], streamed.tracks[split]
        assert a.names == b.names and a.report == b.report
        for field in ("starts", "lengths", "time", "targets", "channels", "label"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None and y is None) or (x.dtype == y.dtype and np.array_equal(x, y)), (split, field)
        assert_same_items(memory.datasets[split], streamed.datasets[split], split)
    assert "tables" not in vars(streamed), "the streaming data module never holds the whole table"


@pytest.mark.parametrize("damage", ["overwritten", "cut-short", "missing"])
def test_a_damaged_cache_is_named_removed_and_rebuilt_never_read(files, tmp_path, damage, caplog):
    cache = tmp_path / "cache"
    first = both(files / "t.csv", cache, chunk_rows=500)[1]
    first.setup("fit")
    channels = next(cache.glob("*/train-channels.f32"))
    original = channels.read_bytes()
    if damage == "overwritten":  # same size: only the manifest's SHA-256 tells
        channels.write_bytes(np.random.default_rng(0).normal(size=len(original) // 4).astype(np.float32).tobytes())
    elif damage == "cut-short":
        with open(channels, "r+b") as handle:
            handle.truncate(1000)
    else:
        channels.unlink()
    with caplog.at_level(logging.WARNING, logger="domains.autonomous.streaming"):
        again = both(files / "t.csv", cache, chunk_rows=500)[1]
        again.setup("fit")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "is damaged" in warned and "train-channels.f32" in warned and "removed and rebuilt" in warned, warned
    assert channels.read_bytes() == original, "rebuilt from the file, not read damaged"
    assert again.stats == first.stats
    assert not list(cache.glob(".*damaged*")) and not list(cache.glob(".*partial*"))


@pytest.mark.parametrize("nan_policy", ["drop", "interpolate"])
def test_a_piece_whose_every_row_is_dropped_adds_no_segment_as_in_memory(files, tmp_path, nan_policy):
    """One vehicle's speed sensor dead for the whole trip: read in chunks of 37 rows, that vehicle is a piece of its
    own with no row left after the NaN rule (build_tracks raised IndexError on it); the tracks are the in-memory ones."""
    frame = pd.read_csv(files / "t.csv")
    frame.loc[frame["sequence"] == "veh0007", "speed"] = np.nan
    frame.to_csv(tmp_path / "dead.csv", index=False)
    memory, streamed = both(tmp_path / "dead.csv", tmp_path / "cache", split_column="fold", nan_policy=nan_policy)
    memory.setup("fit"), streamed.setup("fit")
    split = frame.loc[frame["sequence"] == "veh0007", "fold"].iat[0]
    assert memory.tracks[split].report["dropped_rows"] >= 40 and not any(n.startswith("veh0007") for n in memory.tracks[split].names)
    for name in ("train", "val", "test"):
        a, b = memory.tracks[name], streamed.tracks[name]
        assert a.names == b.names and a.report == b.report, name
        assert np.array_equal(a.starts, b.starts) and np.array_equal(a.lengths, b.lengths) and np.array_equal(a.channels, b.channels), name


def test_streamed_training_has_the_same_losses_tests_and_predictions(files, tmp_path):
    """Real runs through the runner: one epoch each way, then test and predict (``--data.predict_path`` read through
    the same chunked reader) from the streamed run's checkpoint: the same numbers as in memory."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    common = ["--data.path", str(files / "t.csv"), "--data.channels=[speed,yaw_rate]", "--data.observe=6", "--data.predict=4", "--data.batch_size=16",
              "--model.hidden_size=8", "--model.embed_size=4", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
              "--trainer.enable_progress_bar=false", "--runs_dir", str(runs)]  # fmt: skip
    streaming = ["--data.streaming=true", f"--data.cache_dir={cache}", "--data.chunk_rows=300"]
    run_pipeline("autonomous", *common, "--run_id", "memory")
    run_pipeline("autonomous", *common, *streaming, "--run_id", "streamed")
    memory, streamed = (read_jsonl(runs / "autonomous" / run / "metrics.jsonl") for run in ("memory", "streamed"))
    assert [sorted(row) for row in memory] == [sorted(row) for row in streamed]
    compared = 0
    for a, b in zip(memory, streamed):
        for key, value in a.items():
            if key.startswith(("train/", "val/", "test/")) and isinstance(value, float):
                assert value == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
                compared += 1
    assert compared >= 3 and any("train/loss_epoch" in row or "train/loss" in row for row in streamed)

    score = tmp_path / "score.parquet"
    simulate_vehicles(8, 30, 0.25, 5, 0.0).to_parquet(score, index=False, row_group_size=64)
    checkpoint = ["--run_id", "streamed", "--ckpt_path", "best", "--data.predict_path", str(score)]
    run = runs / "autonomous" / "streamed"
    run_pipeline("autonomous", "predict", *common, *checkpoint, "--data.streaming=false", "--data.cache_dir=null")  # (the run's config streams)
    assert yaml.safe_load((run / "config-predict.yaml").read_text())["data"]["streaming"] is False
    in_memory = pd.read_csv(run / "predictions.csv")
    run_pipeline("autonomous", "predict", *common, *streaming, *checkpoint)
    assert yaml.safe_load((run / "config-predict-2.yaml").read_text())["data"]["streaming"] is True  # numbered like its predictions file
    assert yaml.safe_load((run / "config-predict.yaml").read_text())["data"]["streaming"] is False  # the first predict's, kept
    chunked = pd.read_csv(run / "predictions-2.csv")
    assert len(chunked) > 0
    pd.testing.assert_frame_equal(chunked, in_memory)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2, "one cache for the training file, one for the scored file"


def interleaved(table: pd.DataFrame) -> None:
    """trip1's rows 13 to 24 moved after trip2's: trip1 comes back at row 61."""
    moved = table.iloc[[*range(0, 36), *range(48, 72), *range(36, 48), *range(72, len(table))]]
    for column in moved.columns:
        table[column] = moved[column].to_numpy()


def mixed_times(table: pd.DataFrame) -> None:
    """Times as numbers in the first rows, ISO 8601 text after row 60 (read as one kind per chunk)."""
    stamps = (pd.Timestamp("2024-05-01") + pd.to_timedelta(table["time"], unit="s")).dt.strftime("%Y-%m-%dT%H:%M:%S.%f")
    table["time"] = table["time"].astype(object)
    table.loc[60:, "time"] = stamps[60:]


def zones_from_row_73(table: pd.DataFrame) -> None:
    """ISO 8601 times, without a time zone in trips 0-2 (rows 1-72) and with one (+02:00) after: no sequence mixes them."""
    stamps = (pd.Timestamp("2024-05-01") + pd.to_timedelta(table["time"], unit="s")).dt.strftime("%Y-%m-%dT%H:%M:%S.%f")
    table["time"] = stamps.where(table.index < 72, stamps + "+02:00")


STREAM = ("--data.streaming=true", "--data.cache_dir={tmp}/../cache", "--data.chunk_rows=10")
OWN = [
    BadInput("interleaved-sequences", ("--data.path={tmp}/fleet.csv", *BASE, *STREAM), ("fleet.csv row 61", "'sequence'", "'trip1'", "grouped by sequence", "drop --data.streaming"),
             table_file("fleet.csv", interleaved)),  # fmt: skip
    BadInput("time-kinds-differ-between-chunks", ("--data.path={tmp}/fleet.csv", *BASE, *STREAM), ("fleet.csv row 61", "'time'", "iso 8601"),
             table_file("fleet.csv", mixed_times)),  # fmt: skip
    # a time split reads each piece alone: the kinds are carried across pieces and refused as in memory (naive rows moved by the offset)
    BadInput("time-split-zones-differ-between-chunks", ("--data.path={tmp}/fleet.csv", *BASE, *STREAM, "--data.split_by=time",
             "--data.val_after=2024-05-01T00:00:01", "--data.test_after=2024-05-01T00:00:01.8"),
             ("fleet.csv", "'time' (--data.time_column): row 73 holds a time with a time zone", "row 1 one without", "+02:00"), table_file("fleet.csv", zones_from_row_73)),  # fmt: skip
    BadInput("streaming-the-simulator", (*BASE, "--data.streaming=true"), ("--data.streaming true", "--data.path")),
    BadInput("streaming-classification", ("--data.path={tmp}/fleet.csv", *BASE, "--data.streaming=true", "--data.task=classification", "--data.target_column=manoeuvre"),
             ("--data.streaming true", "classification"), table_file("fleet.csv")),  # fmt: skip
    BadInput("streaming-time-split-by-fractions", ("--data.path={tmp}/fleet.csv", *BASE, "--data.streaming=true", "--data.split_by=time", "--data.test_after=2.0"),
             ("--data.streaming true", "--data.val_after"), table_file("fleet.csv")),  # fmt: skip
    BadInput("cache-dir-without-streaming", ("--data.path={tmp}/fleet.csv", *BASE, "--data.cache_dir={tmp}/../cache"), ("--data.cache_dir", "--data.streaming true"),
             table_file("fleet.csv")),  # fmt: skip
    BadInput("chunk-rows-zero", ("--data.path={tmp}/fleet.csv", *BASE, "--data.streaming=true", "--data.chunk_rows=0"), ("--data.chunk_rows", "at least 1"),
             table_file("fleet.csv")),  # fmt: skip
]
#: the bad-input table's cases whose refusal comes from reading a CSV/TSV/Parquet file, read in chunks of 10 rows
READ = {"inf-channel-csv", "float32-overflow-parquet", "missing-sequence-id", "trip-in-milliseconds", "iso-time-with-a-garbled-row", "text-in-channel",
        "duplicate-time", "unsorted-time", "no-track-long-enough", "bad-split-value", "cut-short", "header-only", "duplicate-header"}  # fmt: skip


@pytest.mark.parametrize("case", params(OWN + [dataclasses.replace(c, args=(*c.args, *STREAM)) for c in CASES if c.id in READ]))
def test_bad_input_is_refused_when_streaming_before_anything_is_written(case, tmp_path, capsys):
    message = check_refused("autonomous", dataclasses.replace(case, expect=()), tmp_path, capsys)
    missing = [expected for expected in case.expect if not contains(message, expected)]
    assert not missing, f"{missing} not in the error message:\n{message}"
    cache = tmp_path / "cache"
    if case.id != "no-track-long-enough":  # refused after the (valid) table was cached: its windows are too short
        assert not cache.exists() or not list(cache.iterdir()), f"a refused read left a cache: {list(cache.iterdir())}"
    assert not cache.exists() or not list(cache.glob(".*partial*"))


@pytest.mark.slow  # 70 s on a loaded 2-core machine: the default suite is over its budget (run with -m slow); finance's DDP test covers the shared cache folders
def test_two_process_ddp_streams_one_cache_and_each_rank_trains_on_its_share(files, tmp_path):
    """Real DDP (gloo, 2 CPU processes): both ranks build or map the same cache (no half-written folder left), and
    DistributedSampler gives each rank half the training windows, which it reads from the maps: half the steps."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    result = run_pipeline_process(
        "autonomous", "--data.path", str(files / "t.csv"), "--data.streaming=true", f"--data.cache_dir={cache}", "--data.channels=[speed]",
        "--data.observe=6", "--data.predict=4", "--data.batch_size=16", "--model.hidden_size=8", "--model.embed_size=4", "--trainer.max_epochs=1",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.enable_progress_bar=false", "--runs_dir", str(runs),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1 and not list(cache.glob(".*partial*"))
    streamed = SensorSequenceDataModule(path=str(files / "t.csv"), streaming=True, cache_dir=str(cache), channels=["speed"], target_channels=["x", "y"],
                                        stride=2, nan_policy="interpolate", observe=6, predict=4)  # fmt: skip
    streamed.setup("fit")
    windows = len(streamed.datasets["train"])
    summary = json.loads((only_run(runs, "autonomous") / "summary.json").read_text())
    assert summary["global_step"] == -(-(-(-windows // 2)) // 16), f"{windows} training windows: each rank steps through its half"


@pytest.mark.parametrize("reader", ["autonomous", "finance"])
def test_parquet_chunks_hold_one_row_group_at_a_time(tmp_path, reader):
    """pyarrow's default ``pre_buffer=True`` kept every row group read so far (a 20M-row scoring file grew the process by
    32 MiB per million rows): reading a 100-row-group file in chunks must hold far less than the file."""
    import pyarrow as pa

    from domains.autonomous.streaming import table_chunks
    from domains.finance.sources import iter_chunks

    rows, rng = 200_000, np.random.default_rng(0)
    frame = pd.DataFrame({"sequence": np.repeat([f"s{i}" for i in range(rows // 50)], 50), "time": np.tile(np.arange(50) * 0.1, rows // 50),
                          **{c: rng.normal(size=rows) for c in ("x", "y", "speed")}})  # fmt: skip
    path = tmp_path / "t.parquet"
    frame.to_parquet(path, index=False, row_group_size=2000)
    chunks = table_chunks(path, 1000) if reader == "autonomous" else (chunk for _, chunk in iter_chunks(path, 1000))
    before, peak, seen = pa.total_allocated_bytes(), 0, 0
    for chunk in chunks:
        peak, seen = max(peak, pa.total_allocated_bytes() - before), seen + len(chunk)
    assert seen == rows and peak < path.stat().st_size / 2, f"{peak} bytes held by pyarrow reading a {path.stat().st_size}-byte file in chunks"
