"""Healthcare images from webdataset shards (``--data.shards DIR``): what one sample is, and the shard set a data module reads.

A sample is ``<index>.pixels.npy`` (the image channel-first as the in-memory path serves it: uint8, or float32 in
[0, 1] after resizing), ``<index>.label.npy`` (a class index, or a 0/1 vector for multi-label) and its key, the
item's number in the source (the ``index`` of a batch). The manifest (:mod:`pipelines.shards`) also holds the data
module's fitted state as the writer (:mod:`domains.healthcare.shards_write`) fitted it on the training split, the
transform and each item's name; a run from shards takes that state as a checkpoint's and reads no source.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np

from domains.healthcare.datasets import ImageDataset
from pipelines.errors import InputError
from pipelines.shards import ShardLoader, ShardPlan, ShardStream, check_shard_files, describe_plan, npy_array, npy_bytes, read_manifest

log = logging.getLogger(__name__)

KIND = "healthcare images"
#: data module options that name another source or way of reading it: refused beside --data.shards
OTHER_SOURCES = ("npz_path", "labels_csv", "streaming", "cache_dir", "split_key", "group_column")
#: options the writer's read and split of the source depended on (recorded in the manifest): a run beside the shards that
#: gives another value is refused, since the shards already hold that source split that way
WRITER_OPTIONS = ("split", "val_fraction", "test_fraction", "split_seed", "synthetic_samples", "synthetic_image_size", "synthetic_seed")


def encode(pixels: np.ndarray, label: np.ndarray) -> dict[str, bytes]:
    """One sample's fields (its key is added by the writer)."""
    return {"pixels.npy": npy_bytes(pixels), "label.npy": npy_bytes(np.asarray(label))}


def decode(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """A webdataset sample back to ``(pixels, label, index)``."""
    return npy_array(sample["pixels.npy"]), npy_array(sample["label.npy"]), int(sample["__key__"])


class ItemDecoder:
    """A sample to the item :class:`ImageDataset` gives (augmented for training): the same tensors as in memory."""

    def __init__(self, augment: Any, volume: bool) -> None:
        self.augment, self.volume = augment, volume

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        pixels, label, index = decode(sample)
        return ImageDataset(pixels[None], label[None], np.array([index]), self.augment, self.volume)[0]


class ShardSplit:
    """One split of a shard set, as the data module's ``datasets[name]`` holds it until a loader is made."""

    def __init__(self, shards: ImageShards, name: str, augment: Any, volume: bool) -> None:
        self.shards, self.name, self.decoder = shards, name, ItemDecoder(augment, volume)
        self.entries = shards.manifest["splits"][name]

    def __len__(self) -> int:
        return sum(e["samples"] for e in self.entries)


def option_defaults(data_module: type) -> dict[str, Any]:
    """A data module class's option defaults (what a run that does not name an option gets)."""
    return {name: p.default for name, p in inspect.signature(data_module.__init__).parameters.items() if p.default is not p.empty}


class ImageShards:
    """A healthcare shard folder, checked when opened: the manifest, the options beside it, each shard's presence and size."""

    def __init__(self, folder: str, hparams: Any, defaults: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.where = f"--data.shards {folder}"
        given = [f"--data.{name}" for name in OTHER_SOURCES if hparams.get(name)]
        if given:
            raise InputError(f"{self.where}: the shards are the data (split, resized and fitted by the writer); drop {' and '.join(given)}")
        if hparams.get("balance") == "sampler":
            raise InputError(f"{self.where}: --data.balance sampler draws items by index, and shards are read in order; use class_weights or none")
        self.manifest = read_manifest(self.folder, KIND)
        self.state: dict[str, Any] = self.manifest["state"]
        written, defaults = self.manifest.get("options") or {}, defaults or {}
        differ = [f"--data.{name} {hparams.get(name)!r} (the shards: {written[name]!r})" for name in WRITER_OPTIONS  # a default is not asked for
                  if name in written and hparams.get(name) not in (written[name], defaults.get(name, written[name]))]  # fmt: skip
        if differ:
            raise InputError(f"{self.where}: {', '.join(differ)}: the shards hold the source as the writer read and split it, so these "
                             "options cannot change it here; drop them, or write the shards again with them (python -m domains.healthcare.shards_write)")
        classes, shape = self.state["class_names"], tuple(self.state["image_shape"])
        if hparams.get("class_names") and list(hparams["class_names"]) != classes:
            raise InputError(f"{self.where}: --data.class_names {list(hparams['class_names'])} differ from the shards' classes {classes}")
        size = hparams.get("image_size")
        if size and tuple(shape[1:]) != (size,) * (len(shape) - 1):
            raise InputError(f"{self.where}: --data.image_size {size} differs from the shards' images, {shape} (channels first); drop it or write the shards at that size")
        if hparams.get("task") and hparams["task"] != self.state["task"]:
            raise InputError(f"{self.where}: --data.task {hparams['task']} differs from the shards' task, {self.state['task']}")

    @property
    def names(self) -> list[str]:
        return self.manifest["names"]

    def split(self, name: str, augment: Any, volume: bool) -> ShardSplit:
        """A split, its shards found with their recorded sizes (their SHA-256s are checked when a loader opens them)."""
        check_shard_files(self.folder, self.manifest, name)
        return ShardSplit(self, name, augment, volume)

    def check_checkpoint(self, state: dict[str, Any]) -> None:
        """A checkpoint's classes and input shape must be the shards'."""
        for key, what in (("class_names", "classes"), ("image_shape", "image shape (channels first)")):
            if key in state and list(state[key]) != list(self.state[key]):
                raise InputError(f"{self.where}: the checkpoint was trained on {what} {list(state[key])}, the shards hold {list(self.state[key])}; "
                                 "write the shards from data of the checkpoint's kind")  # fmt: skip

    def check_processes(self, processes: int, datasets: dict[str, Any], batch_size: int, workers: int) -> None:
        """Each split set up for the stage must give ``processes`` DDP processes shards of their own (:class:`ShardPlan`)."""
        for name, split in datasets.items():
            if isinstance(split, ShardSplit):
                ShardPlan.of([e["samples"] for e in split.entries], processes, workers, batch_size, f"{self.where} ({name} split)")

    def loader(self, split: ShardSplit, trainer: Any, batch_size: int, workers: int, pin_memory: bool | None, shuffle: bool, seed: int) -> ShardLoader:
        """The loader of ``split`` for this process (its rank's shards under DDP)."""
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        epoch = trainer.current_epoch if trainer is not None else 0
        sample_bytes = int(np.prod(self.state["image_shape"])) * np.dtype(self.manifest["transform"]["dtypes"][split.name]).itemsize
        stream = ShardStream(self.folder, split.entries, split.decoder, rank=rank, world=world, workers=workers, batch_size=batch_size, shuffle=shuffle,
                             seed=seed, first_epoch=epoch, sample_bytes=sample_bytes, where=f"{self.where} ({split.name} split)")  # fmt: skip
        warning = describe_plan(stream, split.name)
        if warning and rank == 0:
            log.warning(warning)
        return ShardLoader(stream, workers, pin_memory)
