"""Autonomous ``--data.shards DIR`` (domains/autonomous/shards.py, shards_write.py, pipelines/row_shards.py): the writer's
shards hold the in-memory path's windows (covariates included), segment names and fitted statistics; a run from them serves
the same evaluation batches, so one model validated and tested from the shards and from the source gives the same losses
and metrics; a damaged, missing or mismatched shard set is refused in one paragraph, exit 2, naming the shard or option. The
2-process gloo run: ``benchmarks/shards_ddp.py --domain autonomous``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from domains.autonomous.data import SensorSequenceDataModule
from domains.autonomous.shards_write import main as write_main
from domains.autonomous.shards_write import write_shards
from pipelines.errors import InputError
from tests.bad_inputs import BadInput, check_refused
from tests.conftest import only_run, run_pipeline
from tests.test_shards_finance import shard_rows
from tests.test_shards_healthcare import check_writer_refuses, copy_of, damaged

#: what a run gets from domains/autonomous/config.yaml, for data modules built in-process, and a small simulator
SIMULATOR = {"channels": ["speed", "yaw_rate", "accel_long", "accel_lat"], "target_channels": ["x", "y"], "stride": 2, "nan_policy": "interpolate", "sim_vehicles": 60}
TINY = ["--model.hidden_size=16", "--model.embed_size=8", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
        "--trainer.logger=false", "--model.plot_samples=0"]  # fmt: skip


def covariates(tmp: Path) -> dict:
    """A CSV with a categorical channel, per-group scaling and a future-known channel (tests/test_autonomous_covariates.py's trips)."""
    from tests.test_autonomous_covariates import planned_trips

    planned_trips(40).to_csv(tmp / "trips.csv", index=False)
    return {"path": str(tmp / "trips.csv"), "target_channels": ["x", "y"], "channels": ["speed"], "known_future_channels": ["plan"], "categorical_channels": ["road"],
            "group_column": "vehicle", "normalize_by": "group", "split_column": "split", "observe": 4, "predict": 6, "stride": 2}  # fmt: skip


@pytest.fixture(scope="module")
def window_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("autonomous-shards") / "set"
    write_shards(SIMULATOR, str(folder), samples_per_shard=150)
    return folder


@pytest.mark.parametrize("source", ["simulator", "covariates-csv"])
def test_the_shards_hold_the_in_memory_windows_names_and_statistics(source, tmp_path):
    options = SIMULATOR if source == "simulator" else covariates(tmp_path)
    memory = SensorSequenceDataModule(**options)
    memory.setup("fit")
    write_shards(options, str(tmp_path / "shards"), samples_per_shard=100)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["state"] == json.loads(json.dumps(memory.state_dict())), "scaling, classes, time step, drift reference, covariates, split rule"
    for split in ("train", "val", "test"):
        dataset, stored = memory.datasets[split], shard_rows(tmp_path / "shards", split)
        counts = [e["samples"] for e in manifest["splits"][split]]
        assert sum(counts) == len(dataset) and max(counts) <= 100 and max(counts) - min(counts) <= 1
        order = stored["index"].tolist()
        assert sorted(order) == list(range(len(dataset))) and manifest["names"][split] == list(dataset.names)
        expected = torch.utils.data.default_collate([dataset[i] for i in order])
        assert set(stored) == set(expected) and (source == "simulator" or {"codes", "group", "known"} <= set(stored))
        for name, value in expected.items():
            assert stored[name].dtype == value.numpy().dtype and np.array_equal(stored[name], value.numpy()), (split, name)
        assert (order != sorted(order)) == (split == "train"), "the training split is written shuffled, val and test in order"


def test_a_run_from_shards_serves_the_in_memory_batches_and_a_seeded_order_per_epoch(window_shards):
    memory = SensorSequenceDataModule(**SIMULATOR, batch_size=32)
    sharded = SensorSequenceDataModule(shards=str(window_shards), batch_size=32)
    for module in (memory, sharded):
        module.setup("fit")
    assert sharded.input_size == memory.input_size and sharded.time_step == memory.time_step and sharded.hparams.sim_vehicles == 60
    assert json.dumps(sharded.state_dict(), sort_keys=True) == json.dumps(json.loads(json.dumps(memory.state_dict())), sort_keys=True)
    for split in ("val", "test"):  # one process, in order: the very batches
        pairs = list(zip(memory._loader(split), sharded._loader(split), strict=True))
        assert pairs and all(a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a) for a, b in pairs)
    loader = sharded.train_dataloader()
    epochs = [[b["index"] for b in loader] for _ in range(2)]
    train = len(memory.datasets["train"])
    assert len(loader) == len(epochs[0]) == -(-train // 32)
    indices = [torch.cat(epoch).tolist() for epoch in epochs]
    assert sorted(indices[0]) == sorted(indices[1]) == list(range(train)), "one process reads every window each epoch"
    assert indices[0] != indices[1], "shard order and shuffle buffer change with the epoch"
    assert sharded.window_name(5) == memory.window_name(5)


def test_the_same_model_validated_and_tested_from_shards_and_from_the_source_gives_the_same_losses_and_metrics(window_shards, tmp_path):
    import lightning.pytorch as pl

    from domains.autonomous import SPEC
    from domains.autonomous.model import SensorSequenceModel

    memory = SensorSequenceDataModule(**SIMULATOR, batch_size=32)
    sharded = SensorSequenceDataModule(shards=str(window_shards), batch_size=32)
    pl.seed_everything(0)
    model = SensorSequenceModel(hidden_size=16, embed_size=8, plot_samples=0, **{name: getattr(sharded, name) for name, _ in SPEC.links})
    settings = {"default_root_dir": tmp_path, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, **settings)
    trainer.fit(model, datamodule=sharded)
    results = [(trainer.validate(model, datamodule=module, verbose=False), trainer.test(model, datamodule=module, verbose=False)) for module in (sharded, memory)]
    assert results[0] == results[1], results
    assert {"val/loss", "val/score"} <= set(results[0][0][0]) and {"test/loss", "test/ade", "test/fde"} <= set(results[0][1][0])


def test_a_run_from_shards_checkpoints_the_manifest_state_and_predicts_from_it(window_shards, tmp_path):
    """The runner end to end: fit from the shards puts the writer's fitted state into the checkpoint as a run from the source
    would (the manifest's: the first test); ``predict --ckpt_path`` beside the shards scores their test split, naming each
    window's segment as the source does."""
    import pandas as pd

    from pipelines.checkpoints import read_checkpoint

    runs = tmp_path / "runs"
    run_pipeline("autonomous", "fit", "--data.shards", str(window_shards), *TINY, "--runs_dir", str(runs))
    run = only_run(runs, "autonomous")
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["SensorSequenceDataModule"]
    manifest = json.loads((window_shards / "manifest.json").read_text())  # (its state is a source run's: the first test)
    assert json.dumps(state, sort_keys=True) == json.dumps(manifest["state"], sort_keys=True)
    run_pipeline("autonomous", "predict", "--data.shards", str(window_shards), "--ckpt_path", "last", "--run_id", run.name, "--trainer.logger=false", "--runs_dir", str(runs))
    predictions = pd.read_csv(run / "predictions.csv")
    assert sorted(predictions["sequence"]) == sorted(manifest["names"]["test"])


def _other_kind(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "kind": "finance rows"}))


def _cut(folder: Path) -> None:
    (folder / "train-000001.tar").write_bytes((folder / "train-000001.tar").read_bytes()[:-1024])


BAD = [
    ("missing-shard", lambda f: (f / "train-000002.tar").unlink(), ("train-000002.tar", "missing")),
    ("truncated-shard", _cut, ("train-000001.tar", "bytes", "cut short")),
    ("no-manifest", lambda f: (f / "manifest.json").unlink(), ("no manifest.json",)),
    ("another-domains-manifest", _other_kind, ("'finance rows' shards", "expected format 1 of 'autonomous windows' shards")),
]


def test_damaged_or_mismatched_shard_sets_are_refused_before_training(window_shards, tmp_path, capsys):
    """Through the runner (exit 2, one paragraph, no run folder): a missing shard, an option the shards fix, too few shards
    for the processes; the other refusals in-process (the same data module code)."""
    cases = [
        BadInput("missing-shard", ("--data.shards", "{tmp}/set"), ("train-000002.tar", "missing"), damaged(window_shards, lambda f: (f / "train-000002.tar").unlink())),
        BadInput("another-window", ("--data.shards", "{tmp}/set", "--data.observe=6"), ("--data.observe 6 (the shards: 8)", "shards_write"), copy_of(window_shards)),
        BadInput("fewer-shards-than-processes", ("--data.shards", "{tmp}/set", "--trainer.accelerator=cpu", "--trainer.devices=3", "--trainer.strategy=ddp"),
                 ("shard(s) for 3 DDP processes", "--samples_per_shard at most"), copy_of(window_shards)),  # fmt: skip
    ]
    for case in cases:
        (tmp_path / case.id).mkdir()
        check_refused("autonomous", case, tmp_path / case.id, capsys)
    in_process = [(how, {}, expect) for _, how, expect in BAD] + [
        (None, {"path": "x.csv"}, ("drop --data.path",)),
        (None, {"eth_ucy_root": "eth"}, ("drop --data.eth_ucy_root",)),
        (None, {"task": "classification", "target_column": "manoeuvre"}, ('--data.task "classification" (the shards: "forecasting")',)),
    ]  # fmt: skip
    for number, (how, options, expect) in enumerate(in_process):
        files = tmp_path / str(number)
        files.mkdir()
        (damaged(window_shards, how) if how else copy_of(window_shards))(files)
        with pytest.raises(InputError) as refused:
            SensorSequenceDataModule(shards=str(files / "set"), **options).setup("fit")
        flat = " ".join(str(refused.value).split())
        assert all(text in flat for text in expect), (expect, flat)


def test_a_shard_with_an_altered_byte_is_refused_by_name_when_opened(window_shards, tmp_path):
    folder = copy_of(window_shards)(tmp_path)
    shard = folder / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # inside a block's windows: same size, the tar still parses
    shard.write_bytes(bytes(data))
    module = SensorSequenceDataModule(shards=str(folder), num_workers=1, batch_size=32)
    module.setup("fit")  # sizes match: found when the loader worker opens the shard, before any of its windows is used
    loader = module.train_dataloader()
    with pytest.raises(InputError, match=r"shard train-000000\.tar does not match the SHA-256 in manifest\.json") as refused:
        list(loader)
    assert "Traceback" not in str(refused.value)
    del loader, refused  # (the worker's iterator goes now, not in a later test)


def test_a_checkpoint_of_another_covariate_encoding_is_refused(window_shards):
    module = SensorSequenceDataModule(shards=str(window_shards))
    state = module.state_dict()
    with pytest.raises(InputError, match=r"the checkpoint's vocabularies differ from those the shards' windows were encoded with"):
        module.load_state_dict({**state, "vocabularies": {"road": ["urban"]}})
    module.load_state_dict(state)  # its own: taken


def test_the_writer_refuses_an_existing_folder_or_a_bad_source_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    new = str(tmp_path / "new")
    check_writer_refuses(write_main, tmp_path, capsys, [
        (["--output", str(tmp_path / "taken")], "exists"), (["--output", new, "--data.path", str(tmp_path / "no.csv")], "no.csv"),
        (["--output", new, "--samples_per_shard", "0"], "--samples_per_shard"),
        (["--output", new, "--data.shards", str(tmp_path / "taken")], "the writer reads a source"),
        (["--output", new, "--data.sim_vehicles=20", "--data.observe=60"], "window"),
    ])  # fmt: skip


# Slow (out of the default suite): two spawned interpreters and their loader workers, tens of CPU seconds on 2 cores. The
# benchmark `python -m benchmarks.shards_ddp --domain autonomous` runs the same code (run_ddp, check_ranks) on a larger set and
# fails when a check fails; tests/test_shards_finance.py::test_streams_of_two_ranks_and_two_workers_are_disjoint_equal_and_cover_the_split
# covers the shared row stream's plan in-process in the default suite.
@pytest.mark.slow
def test_two_process_ddp_ranks_read_disjoint_shards_and_draw_equal_batches(tmp_path):
    """Real DDP (gloo, 2 CPU processes started by ``ddp_spawn``, one loader worker each), two epochs: each rank's keys come
    from shards no other rank opened, both ranks draw the same number of batches, together they read every key but the
    truncation the plan states, and the order changes with the epoch."""
    from benchmarks.shards_ddp import check_ranks, run_ddp

    shards = tmp_path / "set"
    write_shards(SIMULATOR, str(shards), samples_per_shard=100, multiple_of=2)  # (2 processes x 1 worker: every split needs 2 shards)
    (tmp_path / "ranks").mkdir()
    run_ddp(shards, tmp_path / "ranks", batch_size=32, workers=1, epochs=2, domain="autonomous")
    summary = check_ranks(shards, tmp_path / "ranks", batch_size=32, workers=1, epochs=2, domain="autonomous")
    assert summary["train/0"]["batches_per_rank"] == summary["train/1"]["batches_per_rank"] > 0
    assert summary["train/0"]["order"] != summary["train/1"]["order"], "the seeded shard order and shuffle buffer change with the epoch"
