"""Healthcare ``--data.shards DIR`` (domains/healthcare/shards.py, shards_write.py, pipelines/shards.py): the writer's shards hold
the in-memory path's samples, labels and fitted statistics; a run from them serves the same batches; each DDP rank reads
only its own shards and every rank draws the same number of batches (a real 2-process gloo run); a damaged, missing or
mismatched shard set is refused in one paragraph, exit 2, naming the shard or option."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from domains.healthcare.data import MedicalImageDataModule
from domains.healthcare.shards import decode
from domains.healthcare.shards_write import main as write_main
from domains.healthcare.shards_write import write_shards
from pipelines.errors import InputError
from pipelines.shard_manifest import sealed
from pipelines.shards import ShardPlan, ShardSetWriter, ShardStream, describe_plan
from tests.bad_inputs import BadInput, check_refused
from tests.test_healthcare import image_table

SYNTHETIC = {"synthetic_samples": 120, "synthetic_image_size": 16}


def shard_samples(folder: Path, split: str) -> dict[int, tuple[np.ndarray, np.ndarray, str]]:
    """Every sample of a split's shards, read with webdataset itself: index -> (pixels, label, shard file)."""
    import webdataset as wds

    manifest = json.loads((folder / "manifest.json").read_text())
    out = {}
    for entry in manifest["splits"][split]:
        for sample in wds.tarfile_samples([{"url": str(folder / entry["file"])}]):
            pixels, label, index = decode(sample)
            assert index not in out
            out[index] = (pixels, label, entry["file"])
    return out


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards") / "set"
    write_shards(SYNTHETIC, str(folder), samples_per_shard=10)
    return folder


SOURCES = {
    "synthetic-uint8": lambda tmp: dict(SYNTHETIC),
    "png-resized-float32": lambda tmp: {"labels_csv": str(image_table(tmp)), "image_size": 12},
    "png-multilabel": lambda tmp: {"labels_csv": str(image_table(tmp, labels=["effusion", "nodule", "effusion|nodule", "none"] * 6))},
}


@pytest.mark.parametrize("source", SOURCES)
def test_the_shards_hold_the_in_memory_samples_labels_and_statistics(source, tmp_path):
    options = SOURCES[source](tmp_path)
    memory = MedicalImageDataModule(**options)
    memory.setup("fit")
    write_shards(options, str(tmp_path / "shards"), samples_per_shard=7)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["state"] == json.loads(json.dumps(memory.state_dict())), "classes, shape, channel mean/std, drift reference, class weights, split rule"
    for split in ("train", "val", "test"):
        dataset, stored = memory.datasets[split], shard_samples(tmp_path / "shards", split)
        assert sorted(stored) == sorted(dataset.indices.tolist())
        counts = [e["samples"] for e in manifest["splits"][split]]
        assert sum(counts) == len(dataset) and max(counts) <= 7 and max(counts) - min(counts) <= 1 and len(counts) == -(-len(dataset) // 7)
        for position, index in enumerate(dataset.indices):
            pixels, label, _ = stored[int(index)]
            assert pixels.dtype == dataset.images.dtype and np.array_equal(pixels, dataset.images[position]), (split, index)
            assert np.array_equal(label, dataset.labels[position])
    train_order = [int(s["__key__"]) for e in manifest["splits"]["train"] for s in __import__("webdataset").tarfile_samples([{"url": str(tmp_path / "shards" / e["file"])}])]
    assert train_order != sorted(train_order), "the training split is written in a shuffled order (a shard mixes classes)"


def test_a_run_from_shards_serves_the_in_memory_batches_and_a_seeded_order_per_epoch(synthetic_shards):
    memory = MedicalImageDataModule(**SYNTHETIC, batch_size=8, augment=None)
    sharded = MedicalImageDataModule(shards=str(synthetic_shards), batch_size=8, augment=None)
    for module in (memory, sharded):
        module.setup("fit")
    assert sharded.channel_mean == memory.channel_mean and sharded.reference == memory.reference and sharded.class_weights == memory.class_weights
    for a, b in zip(memory.val_dataloader(), sharded.val_dataloader(), strict=True):  # one process, in order: the very batches
        assert all(torch.equal(a[k], b[k]) for k in ("image", "label", "index"))
    loader = sharded.train_dataloader()
    epochs = [[b for b in loader] for _ in range(2)]
    assert len(loader) == len(epochs[0]) == len(epochs[1]) == -(-84 // 8) + 0 * len(memory.datasets["train"])
    keys = [torch.cat([b["index"] for b in epoch]).tolist() for epoch in epochs]
    assert sorted(keys[0]) == sorted(keys[1]) == sorted(memory.datasets["train"].indices.tolist()), "one process reads every sample each epoch"
    assert keys[0] != keys[1], "shard order and shuffle buffer change with the epoch"
    again = MedicalImageDataModule(shards=str(synthetic_shards), batch_size=8, augment=None)
    again.setup("fit")
    assert torch.cat([b["index"] for b in again.train_dataloader()]).tolist() == keys[0], "seeded: the same run reads the same order"
    position = {int(i): n for n, i in enumerate(memory.datasets["train"].indices)}
    for batch in epochs[0]:
        for image, index in zip(batch["image"], batch["index"].tolist()):
            assert torch.equal(image, memory.datasets["train"][position[index]]["image"])


@pytest.mark.parametrize("counts, world, workers, batch", [([10] * 8 + [4], 2, 0, 8), ([10] * 8 + [4], 2, 2, 8), ([7, 7, 7, 3], 3, 1, 4),
                                                           ([5] * 5, 2, 3, 2), ([100, 1, 1], 2, 0, 16), ([10] * 8 + [4], 1, 2, 8)])  # fmt: skip
def test_each_rank_reads_its_own_shards_and_every_rank_draws_the_same_batches(counts, world, workers, batch):
    plan = ShardPlan.of(counts, world, workers, batch, "test")
    owned = [sorted(i for w in rank for i in w) for rank in plan.shards]
    assert sorted(i for r in owned for i in r) == list(range(len(counts))), "every shard has one owner"
    assert len({sum(rank) for rank in plan.batches}) == 1, plan.batches
    assert plan.skipped == sum(counts) - sum(map(sum, plan.samples)) and (world > 1 or plan.skipped == 0)
    for rank, worker_batches in zip(plan.shards, plan.batches):
        for shards, batches in zip(rank, worker_batches):
            assert batches <= -(-sum(counts[i] for i in shards) // batch)



@pytest.mark.parametrize("counts, world, workers, batch", [([7, 7, 7, 3], 3, 1, 4), ([100, 1, 1], 2, 0, 16), ([9, 8, 8, 8], 2, 2, 1)])
def test_an_evaluation_plan_reads_every_sample_once(counts, world, workers, batch):
    plan = ShardPlan.of(counts, world, workers, batch, "test", equal=False)
    assert plan.skipped == 0 and sum(map(sum, plan.samples)) == sum(counts)
    assert ShardPlan.of(counts, world, workers, batch, "test").skipped > 0, "training's equal batch counts leave samples unread here"


def test_streams_of_two_ranks_and_two_workers_are_disjoint_equal_and_cover_the_split(synthetic_shards):
    """Each (rank, worker) iterated as its loader worker would: the keys a rank sees come only from its shards."""
    manifest = json.loads((synthetic_shards / "manifest.json").read_text())
    entries, where = manifest["splits"]["train"], shard_samples(synthetic_shards, "train")
    module = MedicalImageDataModule(shards=str(synthetic_shards))
    module.setup("fit")
    decoder = module.datasets["train"].decoder
    seen, batches = [], []
    for rank in range(2):
        stream = ShardStream(synthetic_shards, entries, decoder, rank=rank, world=2, workers=2, batch_size=8, shuffle=True, seed=3)
        keys = [b["index"].tolist() for w in range(2) for b in stream.batches(w, epoch=1)]
        assert len(keys) == len(stream)
        seen.append([k for batch in keys for k in batch])
        batches.append(len(keys))
    files = [{where[k][2] for k in keys} for keys in seen]
    assert not files[0] & files[1] and not set(seen[0]) & set(seen[1]) and batches[0] == batches[1]
    assert len(seen[0]) + len(seen[1]) == 84 - stream.plan.skipped and set(seen[0]) | set(seen[1]) <= set(where)
    # 9 shards of 10 or 9 samples on 2 ranks x 2 workers: the fuller rank gives up 3 samples
    assert stream.plan.skipped == 3 and "each reads 6 batches per epoch (equal, or DDP would hang), so 3 of its 84 samples stay unread" in describe_plan(stream, "train")
    even = ShardStream(synthetic_shards, entries, decoder, rank=0, world=1, workers=2, batch_size=8, shuffle=True, seed=3)
    assert even.plan.skipped == 0 and describe_plan(even, "train") is None, "one process reads everything"


def test_shards_written_for_the_processes_and_workers_leave_fewer_samples_unread_than_processes():
    """``--shards_multiple_of processes x workers``: near-equal shards, as many per worker; a scan of shapes and sizes."""
    from pipelines.shards import shard_sizes

    for world in (2, 3, 8):
        for workers in (0, 2):
            for count in range(world * max(1, workers), 1500, 41):
                for batch in (8, 64):
                    plan = ShardPlan.of(shard_sizes(count, 16, world * max(1, workers)), world, workers, batch, "scan")
                    assert plan.skipped < world, (world, workers, count, batch, plan.skipped)


def test_fewer_shards_than_processes_are_refused():
    with pytest.raises(InputError, match=r"2 shard\(s\) for 4 DDP processes.*--samples_per_shard at most 5"):
        ShardPlan.of([10, 8], 4, 0, 8, "--data.shards DIR")


def copy_of(source: Path):
    def make(files: Path) -> Path:
        target = files / "set"
        target.mkdir()
        for path in source.iterdir():
            (target / path.name).write_bytes(path.read_bytes())
        return target

    return make


def damaged(source: Path, how):
    def make(files: Path) -> None:
        how(copy_of(source)(files))

    return make


def _cut(folder: Path) -> None:
    (folder / "train-000003.tar").write_bytes((folder / "train-000003.tar").read_bytes()[:-700])


def _edit_manifest(folder: Path) -> None:
    """A fitted statistic changed by hand: the run would normalise every image with it."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["state"]["channel_mean"] = [0.9]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


BAD = [
    ("missing-shard", lambda f: (f / "train-000002.tar").unlink(), ("train-000002.tar", "missing")),
    ("truncated-shard", _cut, ("train-000003.tar", "bytes", "cut short")),
    ("no-manifest", lambda f: (f / "manifest.json").unlink(), ("no manifest.json",)),
    ("manifest-not-json", lambda f: (f / "manifest.json").write_text("{"), ("manifest.json", "does not parse")),
    ("edited-manifest", _edit_manifest, ("set/manifest.json was changed after the shard writer wrote it", "manifest_sha256", "shards_write")),
]


def test_damaged_or_mismatched_shard_sets_are_refused_before_training(synthetic_shards, tmp_path, capsys):
    cases = [BadInput(name, ("--data.shards", "{tmp}/set"), expect, damaged(synthetic_shards, how)) for name, how, expect in BAD]
    cases += [
        BadInput("class-names", ("--data.shards", "{tmp}/set", "--data.class_names=[a,b,c]"), ("--data.class_names", "normal"), copy_of(synthetic_shards)),
        BadInput("image-size", ("--data.shards", "{tmp}/set", "--data.image_size=32"), ("--data.image_size 32", "(1, 16, 16)"), copy_of(synthetic_shards)),
        BadInput("beside-a-csv", ("--data.shards", "{tmp}/set", "--data.labels_csv=x.csv"), ("drop --data.labels_csv",), copy_of(synthetic_shards)),
        BadInput("sampler", ("--data.shards", "{tmp}/set", "--data.balance=sampler"), ("--data.balance sampler",), copy_of(synthetic_shards)),
        # the shards were written from 120 synthetic samples split 0.15/0.15: another split or set is refused, not ignored
        BadInput("another-split", ("--data.shards", "{tmp}/set", "--data.val_fraction=0.3"), ("--data.val_fraction 0.3 (the shards: 0.15)", "shards_write"), copy_of(synthetic_shards)),
        BadInput("another-synthetic-set", ("--data.shards", "{tmp}/set", "--data.synthetic_samples=500"), ("--data.synthetic_samples 500 (the shards: 120)",), copy_of(synthetic_shards)),
        BadInput("fewer-shards-than-processes", ("--data.shards", "{tmp}/set", "--trainer.accelerator=cpu", "--trainer.devices=3", "--trainer.strategy=ddp"),
                 ("(val split): 2 shard(s) for 3 DDP processes", "--samples_per_shard at most 6"), copy_of(synthetic_shards)),  # fmt: skip
    ]
    for case in cases:
        (tmp_path / case.id).mkdir()
        check_refused("healthcare", case, tmp_path / case.id, capsys)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_with_an_altered_byte_is_refused_by_name_when_opened(synthetic_shards, tmp_path, workers):
    folder = copy_of(synthetic_shards)(tmp_path)
    shard = folder / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1600] ^= 0xFF  # inside a sample's pixels: same size, the tar still parses
    shard.write_bytes(bytes(data))
    module = MedicalImageDataModule(shards=str(folder), num_workers=workers, batch_size=8)
    module.setup("fit")  # sizes match: found when a worker opens the shard, before any of its samples is used
    loader = module.train_dataloader()
    with pytest.raises(InputError, match=r"shard train-000001\.tar does not match the SHA-256 in manifest\.json") as refused:
        list(loader)
    assert "Traceback" not in str(refused.value)
    del loader, refused  # the worker's iterator goes now: left to a later test's garbage collection it cost that test ~5 s


def test_a_checkpoint_of_other_classes_is_refused(synthetic_shards):
    module = MedicalImageDataModule(shards=str(synthetic_shards))
    with pytest.raises(InputError, match=r"checkpoint was trained on classes \['a', 'b'\], the shards hold \['normal', 'benign', 'malignant'\]"):
        module.load_state_dict({**module.state_dict(), "class_names": ["a", "b"]})


def check_writer_refuses(write: Any, tmp_path: Path, capsys: Any, cases: list[tuple[list[str], str]]) -> None:
    """Each writer command line of ``cases`` exits 2 with one message holding its expected text and no traceback, and
    ``tmp_path`` (holding only the folder ``taken``) gets no shard folder, whole or partial. Shared by the domains' writers."""
    for args, expect in cases:
        with pytest.raises(SystemExit) as exit_info:
            write(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and expect in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"], "no shard folder, whole or partial"


def test_the_writer_refuses_an_existing_folder_or_a_bad_source_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    check_writer_refuses(write_main, tmp_path, capsys, [
        (["--output", str(tmp_path / "taken")], "exists"), (["--output", str(tmp_path / "new"), "--data.labels_csv", str(tmp_path / "no.csv")], "no.csv"),
        (["--output", str(tmp_path / "new"), "--samples_per_shard", "0"], "--samples_per_shard"),
    ])  # fmt: skip



@pytest.mark.parametrize("stop", ["an error", "no finish"])
def test_a_write_that_stops_half_way_leaves_no_folder(tmp_path, stop):
    output = tmp_path / "set"
    with pytest.raises((KeyError, RuntimeError)):
        with ShardSetWriter(output, 2, "test samples") as writer:
            writer.begin("train", 5)
            for key in range(5):
                writer.add(f"{key:09d}", {"x.npy": b"1234"})
            if stop == "an error":
                raise KeyError("stopped")
    assert list(tmp_path.iterdir()) == [], "complete or absent: no shards, no partial folder"
    with ShardSetWriter(output, 2, "test samples") as writer:
        writer.begin("train", 5)
        for key in range(5):
            writer.add(f"{key:09d}", {"x.npy": b"1234"})
        writer.finish({})
    manifest = json.loads((output / "manifest.json").read_text())
    assert [e["samples"] for e in manifest["splits"]["train"]] == [2, 2, 1] and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


# Slow (out of the default suite): 35 s of CPU on 2 cores for two spawned interpreters and their loader workers, against the
# suite's 14 s margin. The benchmark command `python -m benchmarks.shards_ddp` runs the same code (run_ddp, check_ranks)
# on a larger set and fails when a check fails; test_streams_of_two_ranks_and_two_workers_are_disjoint_equal_and_cover_the_split
# covers the same plan in-process in the default suite.
@pytest.mark.slow
def test_two_process_ddp_ranks_read_disjoint_shards_and_draw_equal_batches(synthetic_shards, tmp_path):
    """Real DDP (gloo, 2 CPU processes started by ``ddp_spawn``, 2 loader workers each), two epochs, batches of 10: each
    rank's keys come from shards no other rank opened, both ranks draw the same number of batches (the plan leaves 7 of
    the 84 training samples unread per epoch here: 9 shards of 10 or 9 on 2 x 2 readers, 2 batches of 10 each), and together
    they read every other sample."""
    from benchmarks.shards_ddp import check_ranks, run_ddp

    run_ddp(synthetic_shards, tmp_path, batch_size=10, workers=2, epochs=2)
    summary = check_ranks(synthetic_shards, tmp_path, batch_size=10, workers=2, epochs=2)
    assert summary["train/0"]["skipped"] == 7 and summary["val/0"]["skipped"] == 0 and summary["train/0"]["batches_per_rank"] == 4
    assert summary["train/0"]["order"] != summary["train/1"]["order"], "the seeded shard order and shuffle buffer change with the epoch"


def test_a_run_from_shards_checkpoints_the_manifest_state_and_predicts_from_it(synthetic_shards, tmp_path):
    """The runner end to end on one process: fit from shards puts the writer's fitted state into the checkpoint as a run
    from the source would; ``predict --ckpt_path`` then scores the shards' test split, naming each item as the source does."""
    import pandas as pd

    from pipelines.checkpoints import read_checkpoint
    from tests.conftest import only_run, run_pipeline

    runs, fast = tmp_path / "runs", ("--model.network=resnet10", "--model.width=0.25", "--data.batch_size=8", "--trainer.max_epochs=1",
                                     "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false")  # fmt: skip
    run_pipeline("healthcare", "fit", "--data.shards", str(synthetic_shards), *fast, "--runs_dir", str(runs))
    run = only_run(runs, "healthcare")
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["MedicalImageDataModule"]
    memory = MedicalImageDataModule(**SYNTHETIC)
    memory.setup("fit")
    assert json.loads(json.dumps(state)) == json.loads(json.dumps(memory.state_dict())), "the checkpoint holds what a run from the source fits"
    run_pipeline("healthcare", "predict", "--data.shards", str(synthetic_shards), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.logger=false", "--runs_dir", str(runs))
    predictions = pd.read_csv(run / "predictions.csv")
    test = memory.datasets["test"]
    assert sorted(predictions["item"]) == sorted(memory.source.names[i] for i in test.indices)
    assert list(predictions["label"]) == [memory.class_names[int(memory.source.labels[memory.source.names.index(name)])] for name in predictions["item"]]


def test_a_manifest_that_miscounts_a_shard_is_refused_when_the_shard_is_read(synthetic_shards, tmp_path):
    """A rank short of its planned batches would hang DDP: a shard holding another count than its manifest says is refused."""
    folder = copy_of(synthetic_shards)(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["val"][0]["samples"] += 1
    (folder / "manifest.json").write_text(json.dumps(sealed(manifest)))  # as a writer that miscounted would seal it
    module = MedicalImageDataModule(shards=str(folder), batch_size=4)
    module.setup("validate")
    with pytest.raises(InputError, match=r"shard val-000000\.tar holds 9 samples, manifest\.json says 10"):
        list(module.val_dataloader())


def test_the_manifest_carries_its_own_checksum_and_an_older_manifest_without_it_still_reads(synthetic_shards, tmp_path):
    manifest = json.loads((synthetic_shards / "manifest.json").read_text())
    assert manifest["manifest_sha256"] == sealed(manifest)["manifest_sha256"]
    folder = copy_of(synthetic_shards)(tmp_path)
    del manifest["manifest_sha256"]  # as the writer wrote it before the key existed
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    module = MedicalImageDataModule(shards=str(folder), batch_size=8)
    module.setup("fit")
    assert len(list(module.train_dataloader())) == len(module.train_dataloader())
