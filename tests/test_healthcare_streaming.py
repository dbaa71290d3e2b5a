"""Healthcare ``--data.streaming true [--data.cache_dir DIR]``: images read per item or from a memory-mapped pixel
cache (domains/healthcare/lazy_pixels.py, pixel_cache.py) give what decoding every split into memory gives: the same
normalisation statistics, drift reference, batches and training losses; the cache is reused, invalidated by a changed
file or transform, rebuilt when damaged, never left half-written; bad input and bad options are refused as before."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported at collection, as in tests/test_bad_inputs_healthcare.py)
import numpy as np
import pandas as pd
import pytest
import torch

from domains.healthcare.data import MedicalImageDataModule
from domains.healthcare.lazy_pixels import LazyPixels, MappedPixels
from tests.bad_inputs import BadInput, check_refused, params
from tests.conftest import only_run, read_jsonl, run_pipeline, run_pipeline_process
from tests.test_bad_inputs_healthcare import CASES, table
from tests.test_healthcare import FAST, image_table, mixed_depths

SOURCES = {
    "synthetic": lambda tmp: {"synthetic_samples": 90, "synthetic_image_size": 16},
    "png": lambda tmp: {"labels_csv": str(image_table(tmp))},
    "png-resized": lambda tmp: {"labels_csv": str(image_table(tmp)), "image_size": 12},  # float32 pixels after MONAI's Resize
    "mixed-bit-depths": lambda tmp: {"labels_csv": str(image_table(tmp, writer=mixed_depths, suffix=".png"))},  # 8-bit, 16-bit PNG and DICOM
}


def three_ways(options: dict, cache: Path) -> list[MedicalImageDataModule]:
    """In memory, read per item, and from the pixel cache (each set up for ``fit``)."""
    modules = [MedicalImageDataModule(**options), MedicalImageDataModule(**options, streaming=True),
               MedicalImageDataModule(**options, streaming=True, cache_dir=str(cache))]  # fmt: skip
    for module in modules:
        module.setup("fit")
    return modules


@pytest.mark.parametrize("source", SOURCES)
def test_streaming_gives_the_same_statistics_reference_and_batches(source, tmp_path):
    memory, lazy, cached = three_ways(SOURCES[source](tmp_path), tmp_path / "cache")
    train = memory.datasets["train"].images
    axes = (0, *range(2, train.ndim))
    scale = 255.0 if train.dtype == np.uint8 else 1.0
    # today's whole-array formula, within the stated tolerance (numpy sums float32 pixels in float32)
    assert memory.channel_mean == pytest.approx((train.mean(axis=axes) / scale).tolist(), rel=1e-6)
    assert memory.channel_std == pytest.approx((train.std(axis=axes) / scale).tolist(), rel=1e-6)
    for other in (lazy, cached):
        assert other.channel_mean == memory.channel_mean and other.channel_std == memory.channel_std
        assert other.reference == memory.reference
        for split in ("train", "val", "test"):
            a, b = memory.datasets[split], other.datasets[split]
            assert len(a) == len(b) and np.array_equal(a.indices, b.indices)
            for item in range(len(a)):
                x, y = a[item], b[item]
                assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]), (split, item)
    assert isinstance(lazy.datasets["train"].images, LazyPixels) and isinstance(cached.datasets["train"].images, MappedPixels)


def test_a_predict_folder_read_lazily_gives_the_same_items(tmp_path):
    csv = image_table(tmp_path)
    memory, lazy = (MedicalImageDataModule(labels_csv=str(csv), predict_dir=str(tmp_path / "images"), streaming=s) for s in (False, True))
    for module in (memory, lazy):
        module.setup("predict")
    a, b = memory.datasets["predict"], lazy.datasets["predict"]
    assert isinstance(b.images, LazyPixels) and memory.predict_files == lazy.predict_files and len(a) == len(b) == 24
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(len(a)))


def cache_folders(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def test_the_cache_is_reused_invalidated_by_a_changed_file_or_transform_and_rebuilt_when_damaged(tmp_path, capsys):
    cache, csv = tmp_path / "cache", image_table(tmp_path)
    first = MedicalImageDataModule(labels_csv=str(csv), streaming=True, cache_dir=str(cache))
    first.setup("fit")
    (folder,) = cache_folders(cache)
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    MedicalImageDataModule(labels_csv=str(csv), streaming=True, cache_dir=str(cache)).setup("fit")
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == stamps, "a second run maps the cache, writes nothing"

    def batches(**options) -> torch.Tensor:
        module = MedicalImageDataModule(labels_csv=str(csv), streaming=True, cache_dir=str(cache), **options)
        module.setup("fit")
        return torch.stack([module.datasets["train"][i]["image"] for i in range(len(module.datasets["train"]))])

    expected = batches()
    pixels = cache / folder / "pixels.bin"
    data = pixels.read_bytes()
    damages = {
        "truncated": lambda: pixels.write_bytes(data[:-5]),
        "a flipped byte": lambda: pixels.write_bytes(data[:7] + bytes([data[7] ^ 0xFF]) + data[8:]),
        "no meta.json": lambda: (cache / folder / "meta.json").unlink(),
    }
    for what, damage in damages.items():
        damage()
        capsys.readouterr()
        assert torch.equal(batches(), expected), what
        assert f"pixel cache {cache / folder} is damaged" in capsys.readouterr().err, what
        assert cache_folders(cache) == [folder] and pixels.read_bytes() == data, what
    (cache / f".{folder}.partial-0badc0de").mkdir()  # a build killed half-way: ignored
    assert torch.equal(batches(), expected)

    assert batches(image_size=8).shape[-1] == 8 and len(cache_folders(cache)) == 2, "another transform: another cache"
    changed = tmp_path / pd.read_csv(csv)["path"][0]
    from tests.medical_files import write_png

    write_png(changed, np.full((16, 16), 7, np.uint8) + np.eye(16, dtype=np.uint8))
    assert not torch.equal(batches(), expected) and len(cache_folders(cache)) == 3, "a changed image file: another cache"
    assert not list(cache.glob(".*damaged*"))


OPTIONS = [
    BadInput("cache-dir-without-streaming", ("--data.labels_csv", "{tmp}/labels.csv", "--data.cache_dir", "{tmp}/../cache"),
             ("--data.cache_dir", "--data.streaming true"), table),  # fmt: skip
    BadInput("cache-dir-is-a-file", ("--data.labels_csv", "{tmp}/labels.csv", "--data.streaming=true", "--data.cache_dir", "{tmp}/labels.csv"),
             ("--data.cache_dir", "labels.csv", "is a file"), table),  # fmt: skip
    BadInput("streaming-not-a-boolean", ("--data.labels_csv", "{tmp}/labels.csv", "--data.streaming=sometimes"), ("streaming",), table),
]

#: the bad-input table's cases whose refusal comes from reading the pixels: read lazily (the check pass), or into the cache
PIXELS = {"corrupt_png": False, "blank_16bit_png": False, "nifti_nan": False, "mixed_sizes_without_image_size": True, "mixed_channels": True,
          "volume_among_images": True, "twelve_bit_among_8_bit": True}  # fmt: skip


@pytest.mark.parametrize("case", params(OPTIONS))
def test_bad_streaming_options_exit_2_before_anything_is_written(case, tmp_path, capsys):
    check_refused("healthcare", case, tmp_path, capsys)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("case", params([c for c in CASES if c.id in PIXELS]))
def test_the_bad_image_table_is_refused_the_same_when_streaming(case, tmp_path, capsys):
    """Every image is read and checked before training (the lazy path's check pass, the cache's build), with the same
    message naming the row and file; a refused build leaves no cache folder, whole or half."""
    cache = ("--data.cache_dir", "{tmp}/../cache") if PIXELS[case.id] else ()
    check_refused("healthcare", dataclasses.replace(case, args=(*case.args, "--data.streaming=true", *cache)), tmp_path, capsys)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_streamed_training_has_the_same_losses(tiny_run, tmp_path):
    """The session's tiny healthcare run (in memory) trained again from the pixel cache: the same metrics, step by step."""
    from pipelines.domain_registry import get_domain

    memory_run, runs = tiny_run("healthcare"), tmp_path / "runs"
    run_pipeline("healthcare", *get_domain("healthcare").test_args, "--runs_dir", str(runs), "--data.streaming=true", f"--data.cache_dir={tmp_path / 'cache'}")
    memory, streamed = read_jsonl(memory_run / "metrics.jsonl"), read_jsonl(only_run(runs, "healthcare") / "metrics.jsonl")
    assert [sorted(row) for row in memory] == [sorted(row) for row in streamed]
    compared = {key for row in memory for key in row if key.split("/")[-1] in ("loss_epoch", "loss", "auroc") and key.startswith(("train", "val", "test"))}
    assert {"train/loss_epoch", "val/loss"} <= compared
    for a, b in zip(memory, streamed):
        for key in compared & set(a):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


# Slow (out of the default suite): 27 s of the suite's 10-minute budget for two more interpreters, while the cache's
# race between DDP ranks is pipelines/cache_folders.py's `building`, shared with finance, whose 2-process DDP test
# (tests/test_finance_streaming.py) stays in the default suite; healthcare's 2-process DDP stays there too (test_platform.py).
@pytest.mark.slow
def test_two_process_ddp_maps_one_complete_cache(tmp_path):
    """Real DDP (gloo, 2 CPU processes): the runner reads the data (building the cache) before the ranks start; both map
    the one complete cache, no temporary folder is left.

    Run with ``pytest -m slow tests/test_healthcare_streaming.py``. The benchmark command
    ``python -m benchmarks.compare_revisions --base HEAD --domains healthcare --repeats 1 -- --config
    pipelines/configs/ddp_sim.yaml --data.streaming=true --data.cache_dir=/tmp/healthcare-pixel-cache`` trains
    the same way (2-process DDP from a pixel cache, the cache built before the ranks start) and fails if a run
    does, but checks nothing of the cache: this test does."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    result = run_pipeline_process(
        "healthcare", "--data.synthetic_samples=64", "--data.synthetic_image_size=16", "--data.streaming=true", f"--data.cache_dir={cache}",
        *FAST, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--runs_dir", str(runs),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(cache_folders(cache)) == 1 and not [p for p in cache.iterdir() if p.name.startswith(".")]
    summary = json.loads((only_run(runs, "healthcare") / "summary.json").read_text())
    assert summary["global_step"] == 2
