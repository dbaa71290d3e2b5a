"""Finance ``--data.shards DIR`` (domains/finance/shards.py, shards_write.py, pipelines/row_shards.py): the writer's shards
hold the in-memory path's encoded rows and fitted state; a run from them serves the same evaluation batches, so one
checkpoint tested from the shards and from the source gives the same metrics; a damaged, missing or mismatched shard set is
refused in one paragraph, exit 2, naming the shard or option. The 2-process gloo run: ``benchmarks/shards_ddp.py --domain finance``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from domains.finance.data import SYNTHETIC_ROLES, TransactionDataModule
from domains.finance.shards_write import main as write_main
from domains.finance.shards_write import write_shards
from pipelines.errors import InputError
from pipelines.row_shards import decode_block
from tests.bad_inputs import BadInput, check_refused
from tests.conftest import only_run, run_pipeline
from tests.test_shards_healthcare import check_writer_refuses, copy_of, damaged

SMALL = {"synthetic_rows": 1500}
#: what a run gets from domains/finance/config.yaml, for data modules built in-process
CONFIG = {**SYNTHETIC_ROLES, "label_classes": [0, 1]}
TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--data.batch_size=64", "--model.hidden_dims=[16]", "--model.latent_dim=4",
        "--trainer.logger=false"]  # fmt: skip


def shard_rows(folder: Path, split: str) -> dict[str, np.ndarray]:
    """Every row of a split's shards in the written order, read with webdataset itself."""
    import webdataset as wds

    manifest = json.loads((folder / "manifest.json").read_text())
    blocks = [decode_block(s) for e in manifest["splits"][split] for s in wds.tarfile_samples([{"url": str(folder / e["file"])}])]
    return {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}


@pytest.fixture(scope="module")
def finance_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finance-shards") / "set"
    write_shards({**CONFIG, **SMALL}, str(folder), samples_per_shard=300)
    return folder


def test_the_shards_hold_the_encoded_rows_and_fitted_state(finance_shards):
    memory = TransactionDataModule(**CONFIG, **SMALL)
    memory.setup("fit")
    manifest = json.loads((finance_shards / "manifest.json").read_text())
    assert manifest["state"] == json.loads(json.dumps(memory.state_dict())), "preprocessing, split rule and drift reference"
    assert manifest["facts"] == memory.describe_data() and manifest["options"]["synthetic_rows"] == 1500
    for split in ("train", "val", "test"):
        dataset, stored = memory._split(split), shard_rows(finance_shards, split)
        counts = [e["samples"] for e in manifest["splits"][split]]
        assert sum(counts) == len(dataset) and max(counts) <= 300 and max(counts) - min(counts) <= 1 and len(counts) == -(-len(dataset) // 300)
        position = {int(r): n for n, r in enumerate(dataset.rows)}
        order = [position[int(r)] for r in stored["row"]]
        assert sorted(order) == list(range(len(dataset)))
        expected = dataset.__getitems__(order)
        for name, value in expected.items():
            assert stored[name].dtype == value.numpy().dtype and np.array_equal(stored[name], value.numpy()), (split, name)
        assert (order != sorted(order)) == (split == "train"), "the training split is written shuffled, val and test in order"


def test_a_run_from_shards_serves_the_in_memory_batches_and_a_seeded_order_per_epoch(finance_shards):
    memory = TransactionDataModule(**CONFIG, **SMALL, batch_size=64)
    sharded = TransactionDataModule(shards=str(finance_shards), batch_size=64)
    for module in (memory, sharded):
        module.setup("fit")
    assert sharded.num_numeric == memory.num_numeric and sharded.feature_groups == memory.feature_groups
    assert json.dumps(sharded.state_dict(), sort_keys=True) == json.dumps(memory.state_dict(), sort_keys=True), "what goes into the checkpoint"
    for split in ("val", "test"):  # one process, in order: the very batches
        pairs = list(zip(memory._loader(split), sharded._loader(split), strict=True))
        assert pairs and all(a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a) for a, b in pairs)
    loader = sharded.train_dataloader()
    epochs = [[b["row"] for b in loader] for _ in range(2)]
    train = len(memory._split("train"))
    assert len(loader) == len(epochs[0]) == -(-train // 64) and all(len(b) == 64 for b in epochs[0][:-1])
    rows = [torch.cat(epoch).tolist() for epoch in epochs]
    assert sorted(rows[0]) == sorted(rows[1]) == sorted(memory._split("train").rows.tolist()), "one process reads every row each epoch"
    assert rows[0] != rows[1], "shard order and shuffle buffer change with the epoch"
    again = TransactionDataModule(shards=str(finance_shards), batch_size=64)
    again.setup("fit")
    assert torch.cat([b["row"] for b in again.train_dataloader()]).tolist() == rows[0], "seeded: the same run reads the same order"


def test_the_same_model_validated_and_tested_from_shards_and_from_the_source_gives_the_same_losses_and_metrics(finance_shards, tmp_path):
    """A real Trainer: trained from the shards, then validated and tested on the shards and on the source (threshold fitted
    on each validation): the very same losses and metrics."""
    import lightning.pytorch as pl

    from domains.finance.model import FraudAutoencoder

    memory = TransactionDataModule(**CONFIG, **SMALL, batch_size=64)
    sharded = TransactionDataModule(shards=str(finance_shards), batch_size=64)
    links = {name: getattr(sharded, name) for name in ("num_numeric", "categorical_cardinalities", "feature_groups", "numeric_feature_groups", "categorical_feature_groups")}
    pl.seed_everything(0)
    model = FraudAutoencoder(hidden_dims=[16], latent_dim=4, **links)
    settings = {"default_root_dir": tmp_path, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, inference_mode=False, **settings)  # (validation fits the Platt calibration: gradients)
    trainer.fit(model, datamodule=sharded)
    results = [(trainer.validate(model, datamodule=module, verbose=False), trainer.test(model, datamodule=module, verbose=False)) for module in (sharded, memory)]
    assert results[0] == results[1], results
    assert {"val/loss", "val/auprc"} <= set(results[0][0][0]) and {"test/loss", "test/auprc", "test/f1"} <= set(results[0][1][0])


def test_a_run_from_shards_checkpoints_the_manifest_state_and_scores_a_file(finance_shards, tmp_path):
    """The runner end to end: fit from the shards puts the writer's fitted state into the checkpoint as a run from the source
    would; ``predict --ckpt_path`` beside the shards scores a file with it."""
    from domains.finance.synthetic import make_card_transactions
    from pipelines.checkpoints import read_checkpoint

    runs = tmp_path / "runs"
    run_pipeline("finance", "fit", "--data.shards", str(finance_shards), *TINY, "--trainer.limit_val_batches=2", "--runs_dir", str(runs))
    run = only_run(runs, "finance")
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["TransactionDataModule"]
    assert json.dumps(state, sort_keys=True) == json.dumps(TransactionDataModule(**CONFIG, **SMALL).state_dict(), sort_keys=True)
    make_card_transactions(40, 0.1, seed=4).to_csv(tmp_path / "new.csv", index=False)
    run_pipeline("finance", "predict", "--data.shards", str(finance_shards), "--data.predict_path", str(tmp_path / "new.csv"), "--trainer.logger=false",
                 "--run_id", run.name, "--ckpt_path", "last", "--runs_dir", str(runs))  # fmt: skip
    scored = __import__("pandas").read_csv(run / "predictions.csv")
    assert len(scored) == 40 and scored["score"].notna().all()
    # resuming from the same shards: the writer's options (here synthetic_rows 1500) are the run's, not refused as changed
    epoch = read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"]
    run_pipeline("finance", "fit", "--data.shards", str(finance_shards), *TINY, "--trainer.max_epochs=2", "--trainer.limit_val_batches=2",
                 "--run_id", run.name, "--ckpt_path", "last", "--runs_dir", str(runs))  # fmt: skip
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] > epoch


def _cut(folder: Path) -> None:
    (folder / "train-000001.tar").write_bytes((folder / "train-000001.tar").read_bytes()[:-1024])


def _other_kind(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "kind": "healthcare images"}))


BAD = [
    ("missing-shard", lambda f: (f / "train-000002.tar").unlink(), ("train-000002.tar", "missing")),
    ("truncated-shard", _cut, ("train-000001.tar", "bytes", "cut short")),
    ("no-manifest", lambda f: (f / "manifest.json").unlink(), ("no manifest.json",)),
    ("another-domains-manifest", _other_kind, ("'healthcare images' shards", "expected format 1 of 'finance rows' shards")),
]


def test_damaged_or_mismatched_shard_sets_are_refused_before_training(finance_shards, tmp_path, capsys):
    """Through the runner (exit 2, one paragraph, no run folder): a missing shard, an option the shards fix, too few shards
    for the processes; the other refusals in-process (the same data module code, a tenth of the time)."""
    cases = [
        BadInput("missing-shard", ("--data.shards", "{tmp}/set"), ("train-000002.tar", "missing"), damaged(finance_shards, lambda f: (f / "train-000002.tar").unlink())),
        BadInput("another-split", ("--data.shards", "{tmp}/set", "--data.val_fraction=0.3"), ("--data.val_fraction 0.3 (the shards: 0.15)", "shards_write"), copy_of(finance_shards)),
        BadInput("fewer-shards-than-processes", ("--data.shards", "{tmp}/set", "--trainer.accelerator=cpu", "--trainer.devices=3", "--trainer.strategy=ddp"),
                 ("2 shard(s) for 3 DDP processes", "--samples_per_shard at most"), copy_of(finance_shards)),  # fmt: skip
    ]
    for case in cases:
        (tmp_path / case.id).mkdir()
        check_refused("finance", case, tmp_path / case.id, capsys)
    in_process = [(how, {}, "fit", expect) for _, how, expect in BAD] + [
        (None, {"path": "x.csv"}, "fit", ("drop --data.path",)),
        (None, {"categorical_columns": ["channel"]}, "fit", ('--data.categorical_columns ["channel"]',)),
        (None, {}, "predict", ("predict writes each scored row with its original values", "--data.predict_path")),
    ]  # fmt: skip
    for number, (how, options, stage, expect) in enumerate(in_process):
        files = tmp_path / str(number)
        files.mkdir()
        (damaged(finance_shards, how) if how else copy_of(finance_shards))(files)
        with pytest.raises(InputError) as refused:
            TransactionDataModule(shards=str(files / "set"), **options).setup(stage)
        flat = " ".join(str(refused.value).split())
        assert all(text in flat for text in expect), (expect, flat)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_with_an_altered_byte_is_refused_by_name_when_opened(finance_shards, tmp_path, workers):
    folder = copy_of(finance_shards)(tmp_path)
    shard = folder / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # inside a block's numeric features: same size, the tar still parses
    shard.write_bytes(bytes(data))
    module = TransactionDataModule(shards=str(folder), num_workers=workers, batch_size=64)
    module.setup("fit")  # sizes match: found when a worker opens the shard, before any of its rows is used
    loader = module.train_dataloader()
    with pytest.raises(InputError, match=r"shard train-000000\.tar does not match the SHA-256 in manifest\.json") as refused:
        list(loader)
    assert "Traceback" not in str(refused.value)
    del loader, refused  # (the worker's iterator goes now, not in a later test)


def test_a_checkpoint_of_another_preprocessing_is_refused(finance_shards):
    module = TransactionDataModule(shards=str(finance_shards))
    state = module.state_dict()
    other = {**state, "preprocessor": {**state["preprocessor"], "medians": {**state["preprocessor"]["medians"], "amount": 99.0}}}
    with pytest.raises(InputError, match=r"checkpoint's preprocessing .* is not the one that encoded the shards"):
        module.load_state_dict(other)
    module.load_state_dict(state)  # its own: taken


def test_the_writer_refuses_an_existing_folder_or_a_bad_source_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    new = str(tmp_path / "new")
    check_writer_refuses(write_main, tmp_path, capsys, [
        (["--output", str(tmp_path / "taken")], "exists"), (["--output", new, "--data.path", str(tmp_path / "no.csv")], "no.csv"),
        (["--output", new, "--samples_per_shard", "0"], "--samples_per_shard"),
        (["--output", new, "--data.shards", str(tmp_path / "taken")], "the writer reads a source"),
        (["--output", new, "--data.synthetic_rows=300", "--data.numeric_columns=[customer_age]"], "--data.ignore_columns"),
    ])  # fmt: skip


def test_groups_of_mini_batches_from_shards_follow_the_one_batch_per_step_trajectory(finance_shards, tmp_path):
    """``--model.batches_per_step 4`` from shards: the same optimizer steps on the same batches as one batch per step
    (bitwise weights), ``limit_train_batches`` counting mini-batches (5: groups of 4 + 1, 2 epochs); with two loader
    workers it is refused (a worker's short last batch inside a group would give ranks unequal steps)."""
    import lightning.pytorch as pl

    from domains.finance.model import FraudAutoencoder

    names = ("num_numeric", "categorical_cardinalities", "feature_groups", "numeric_feature_groups", "categorical_feature_groups")
    runs = []
    for per_step in (1, 4):
        module = TransactionDataModule(shards=str(finance_shards), batch_size=64)
        pl.seed_everything(0, verbose=False)
        model = FraudAutoencoder(hidden_dims=[16], latent_dim=4, batches_per_step=per_step, **{name: getattr(module, name) for name in names})
        trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=2, limit_train_batches=5, limit_val_batches=0, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(model, datamodule=module)
        runs.append((trainer, model))
    (one, model1), (grouped, model4) = runs
    assert grouped.global_step == one.global_step == 10 and grouped.num_training_batches == 2 and not model4.automatic_optimization
    assert all(torch.equal(value, model4.state_dict()[key]) or bool(torch.isnan(value).all()) for key, value in model1.state_dict().items())
    module = TransactionDataModule(shards=str(finance_shards), batch_size=64, num_workers=2)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(InputError, match=r"--model.batches_per_step 4 with --data.num_workers 2"):
        trainer.fit(FraudAutoencoder(hidden_dims=[16], latent_dim=4, batches_per_step=4, **{name: getattr(module, name) for name in names}), datamodule=module)


def test_streams_of_two_ranks_and_two_workers_are_disjoint_equal_and_cover_the_split(finance_shards):
    """Each (rank, worker) iterated as its loader worker would: a rank's rows come only from its own shards, both ranks
    draw the same number of batches, and together they read every row but the truncation the plan states."""
    from pipelines.row_shards import RowBlockStream

    import webdataset as wds

    entries = json.loads((finance_shards / "manifest.json").read_text())["splits"]["train"]
    shard_of = {row: e["file"] for e in entries for s in wds.tarfile_samples([{"url": str(finance_shards / e["file"])}]) for row in decode_block(s)["row"].tolist()}
    seen, batches = [], []
    for rank in range(2):
        stream = RowBlockStream(finance_shards, entries, decode_block, rank=rank, world=2, workers=2, batch_size=64, shuffle=True, seed=3)
        rows = [b["row"].tolist() for w in range(2) for b in stream.batches(w, epoch=1)]
        assert len(rows) == len(stream) and all(len(r) <= 64 for r in rows)
        seen.append([r for batch in rows for r in batch])
        batches.append(len(rows))
    assert batches[0] == batches[1] and not {shard_of[r] for r in seen[0]} & {shard_of[r] for r in seen[1]} and len(set(seen[0])) == len(seen[0])
    assert len(seen[0]) + len(seen[1]) == sum(e["samples"] for e in entries) - stream.plan.skipped



def test_evaluation_streams_of_two_ranks_read_every_row_once(finance_shards):
    """A validation or test split under DDP: each row read by one rank, none left out (ranks may draw different
    numbers of batches); training's equal batch counts would leave the fuller rank's last rows unread here."""
    from pipelines.row_shards import RowBlockStream

    entries = json.loads((finance_shards / "manifest.json").read_text())["splits"]["test"]
    assert len({e["samples"] for e in entries}) == 2, "the check needs shards of unequal sizes (194 and 193 rows)"
    seen = []
    for rank in range(2):
        stream = RowBlockStream(finance_shards, entries, decode_block, rank=rank, world=2, workers=1, batch_size=1, shuffle=False, seed=3)
        seen += [r for b in stream.batches(0, epoch=0) for r in b["row"].tolist()]
    assert len(seen) == len(set(seen)) == sum(e["samples"] for e in entries)


# Slow (out of the default suite): two spawned interpreters and their loader workers, tens of CPU seconds on 2 cores. The
# benchmark `python -m benchmarks.shards_ddp --domain finance` runs the same code (run_ddp, check_ranks) on a larger set and
# fails when a check fails; test_streams_of_two_ranks_and_two_workers_are_disjoint_equal_and_cover_the_split covers the plan
# in-process in the default suite.
@pytest.mark.slow
def test_two_process_ddp_ranks_read_disjoint_shards_and_draw_equal_batches(tmp_path):
    """Real DDP (gloo, 2 CPU processes started by ``ddp_spawn``, one loader worker each), two epochs: each rank's keys come
    from shards no other rank opened, both ranks draw the same number of batches, together they read every key but the
    truncation the plan states, and the order changes with the epoch."""
    from benchmarks.shards_ddp import check_ranks, run_ddp

    shards = tmp_path / "set"
    write_shards({**CONFIG, **SMALL}, str(shards), samples_per_shard=200, multiple_of=2)  # (2 processes x 1 worker: every split needs 2 shards)
    (tmp_path / "ranks").mkdir()
    run_ddp(shards, tmp_path / "ranks", batch_size=64, workers=1, epochs=2, domain="finance")
    summary = check_ranks(shards, tmp_path / "ranks", batch_size=64, workers=1, epochs=2, domain="finance")
    assert summary["train/0"]["batches_per_rank"] == summary["train/1"]["batches_per_rank"] > 0
    assert summary["train/0"]["order"] != summary["train/1"]["order"], "the seeded shard order and shuffle buffer change with the epoch"
