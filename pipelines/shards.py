"""Data sharded for many nodes: webdataset tar shards plus a ``manifest.json``, read so that each DDP rank opens only
its own shards, every rank draws the same number of training batches and every evaluation sample is read once.

Shared by every domain; a domain says only what one sample is (its fields as bytes, and back). Tables (finance's rows,
autonomous's windows) store blocks of rows as one sample each, counted in rows: :mod:`pipelines.row_shards`.

- :class:`ShardSetWriter`: ``<split>-000000.tar``, ... of at most ``samples_per_shard`` samples each, sizes differing
  by at most one and their number optionally a multiple of the processes that will read them (:func:`shard_sizes`;
  webdataset's ``TarWriter``, a fixed mtime: the same samples make the same bytes), and ``manifest.json`` (per shard: file,
  sample count, bytes, SHA-256; plus what the domain adds: classes, transform, fitted statistics; and ``manifest_sha256``,
  the checksum of its own content, :mod:`pipelines.shard_manifest`), written into a
  temporary folder renamed when complete (:func:`pipelines.cache_folders.building`): complete or absent.
- :func:`read_manifest` / :func:`check_shard_files`: the manifest parsed and each shard of a split found with its
  recorded size, before training; :func:`verify_shard`: its SHA-256, checked when a loader worker opens it, before
  any of its samples is used (once per worker process).
- :class:`ShardPlan`: which shards each rank and each loader worker reads (fixed for the run, balanced by sample
  counts, largest shard first), and how many batches each worker yields: in training every rank yields the same
  number (DDP hangs otherwise): the smallest rank's count, the samples this leaves unread counted; a validation or
  test split is read whole, each sample by one rank (its metrics are those of one process).
- :class:`ShardStream` (an ``IterableDataset`` of whole batches) and :class:`ShardLoader` (its ``DataLoader``,
  re-raising a worker's refusal as the :class:`~pipelines.errors.InputError` it was).

Why webdataset and not LitData or mosaicml-streaming: both need torchvision, which does not import beside the
pinned torch. webdataset needs numpy, pyyaml and braceexpand; tar shards are readable by any tool.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data import default_collate

from pipelines.cache_folders import building
from pipelines.errors import InputError
from pipelines.files import destination_problem, sha256_file
from pipelines.shard_manifest import check_sealed, sealed

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
#: a refusal found in a loader worker travels to the main process as this one-key batch
REFUSED = "__refused__"
#: samples a training worker's shuffle buffer holds at most (bounded by bytes too: :attr:`ShardStream.buffer`)
SHUFFLE_BYTES = 1 << 26


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes (no pickle)."""
    out, array = io.BytesIO(), np.asarray(array)
    np.save(out, array if array.flags.c_contiguous else array.copy(order="C"), allow_pickle=False)  # (ascontiguousarray makes a scalar 1-D)
    return out.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    """``.npy`` bytes back to an array; a pickled object is refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def shard_sizes(count: int, samples_per_shard: int, multiple_of: int = 1) -> list[int]:
    """Sizes of the shards ``count`` samples are cut into: as few as hold at most ``samples_per_shard`` each, rounded up to
    a multiple of ``multiple_of`` (the number of processes x loader workers that will read them), sizes differing by at
    most one, so that ranks get equal shares (:class:`ShardPlan`).

    >>> shard_sizes(84, 10), shard_sizes(84, 10, multiple_of=4), shard_sizes(3, 10, multiple_of=4)
    ([10, 10, 10, 9, 9, 9, 9, 9, 9], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7], [1, 1, 1])
    """
    shards = math.ceil(count / samples_per_shard)
    shards = min(count, math.ceil(shards / multiple_of) * multiple_of)
    return [len(part) for part in np.array_split(np.arange(count), shards)] if count else []


class ShardSetWriter:
    """Samples of each split into tar shards (:func:`shard_sizes`), then ``manifest.json``; complete or absent.

    Use as ``with ShardSetWriter(folder, n, kind) as writer: writer.begin(split, count); writer.add(key, fields); ...;
    writer.finish(extra)``. ``fields`` maps a webdataset extension (``"pixels.npy"``) to bytes. Leaving the block
    without :meth:`finish` (an error, a signal) leaves nothing.
    """

    def __init__(self, folder: str | Path, samples_per_shard: int, kind: str, multiple_of: int = 1, option: str = "--output") -> None:
        if samples_per_shard < 1 or multiple_of < 1:
            raise InputError(f"--samples_per_shard ({samples_per_shard}) and --shards_multiple_of ({multiple_of}) must be >= 1")
        self.folder, self.samples_per_shard, self.kind, self.multiple_of, self.option = Path(folder), samples_per_shard, kind, multiple_of, option
        if self.folder.exists():
            raise InputError(f"{option} {self.folder}: exists; shards are written into a new folder, never over an older set")
        problem = destination_problem(self.folder, option, folder=True)
        if problem:
            raise InputError(problem)
        self.splits: dict[str, list[dict[str, Any]]] = {}
        self._writer: Any = None
        self._split: str | None = None
        self._sizes: list[int] = []
        self._finished = False

    def __enter__(self) -> ShardSetWriter:
        self._building = building(self.folder, self.option)
        self.partial = self._building.__enter__()
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        unfinished = kind is None and not self._finished
        if unfinished:
            kind, error = RuntimeError, RuntimeError("ShardSetWriter: the block ended without finish(); nothing was written")
        if self._writer is not None:
            self._writer.close()
        self._building.__exit__(kind, error, traceback)  # renames the folder into place, or (an error) removes it
        if unfinished:
            raise error

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        entry = self.splits[self._split][-1]  # type: ignore[index]
        path = self.partial / entry["file"]
        entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
        self._writer = None

    def _check_complete(self) -> None:
        if self._split is not None and [e["samples"] for e in self.splits[self._split]] != self._sizes:
            raise ValueError(f"ShardSetWriter: split {self._split!r} was declared with {sum(self._sizes)} samples; "
                             f"{sum(e['samples'] for e in self.splits[self._split])} came")  # fmt: skip

    def begin(self, split: str, count: int) -> None:
        """The next split and how many samples it has (its shards' sizes follow from that)."""
        self._close_shard()
        self._check_complete()
        if split in self.splits:
            raise ValueError(f"ShardSetWriter: split {split!r} was written already")
        self._split, self._sizes, self.splits[split] = split, shard_sizes(count, self.samples_per_shard, self.multiple_of), []

    def room(self) -> int:
        """Samples the shard the next :meth:`add` goes into still takes (a new shard's size when the current one is full)."""
        shards = self.splits[self._split]  # type: ignore[index]
        if shards and shards[-1]["samples"] < self._sizes[len(shards) - 1]:
            return self._sizes[len(shards) - 1] - shards[-1]["samples"]
        return self._sizes[len(shards)] if len(shards) < len(self._sizes) else 0

    def add(self, key: str, fields: dict[str, bytes], samples: int = 1) -> None:
        """One sample of the split begun last, into its current shard (a new one when that is full); ``samples``: how many
        it counts for (a block of table rows, :mod:`pipelines.row_shards`: at most :meth:`room`)."""
        import webdataset as wds

        assert self._split is not None, "begin(split, count) first"
        shards = self.splits[self._split]
        if not shards or shards[-1]["samples"] >= self._sizes[len(shards) - 1]:
            self._close_shard()
            if len(shards) == len(self._sizes):
                raise ValueError(f"ShardSetWriter: more samples of split {self._split!r} than the {sum(self._sizes)} declared")
            shards.append({"file": shard_name(self._split, len(shards)), "samples": 0})
            self._writer = wds.TarWriter(str(self.partial / shards[-1]["file"]), encoder=False, mtime=0.0)
        if shards[-1]["samples"] + samples > self._sizes[len(shards) - 1]:
            raise ValueError(f"ShardSetWriter: a block of {samples} samples does not fit in shard {shards[-1]['file']} (room(): split blocks at shard ends)")
        self._writer.write({"__key__": key, **fields})
        shards[-1]["samples"] += samples

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Close the last shard and write ``manifest.json`` (with ``extra``, the domain's part); the folder is renamed
        into place when the ``with`` block ends."""
        self._close_shard()
        self._check_complete()
        manifest = {"format": FORMAT, "kind": self.kind, "samples_per_shard": self.samples_per_shard, "shards_multiple_of": self.multiple_of,
                    "splits": self.splits, **extra}  # fmt: skip
        manifest = sealed(manifest)  # with manifest_sha256, the checksum of its own content (pipelines/shard_manifest.py)
        (self.partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        self._finished = True
        return manifest


def read_manifest(folder: str | Path, kind: str, option: str = "--data.shards") -> dict[str, Any]:
    """The manifest of a shard folder written for ``kind``, or :class:`InputError` naming what is wrong."""
    folder = Path(folder)
    where = f"{option} {folder}"
    if not folder.is_dir():
        raise InputError(f"{where}: {'is a file' if folder.exists() else 'not found'}; expected a folder of shards written by the shard writer")
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"{where}: no {MANIFEST}; a shard folder is written complete with its manifest (or not at all), so this is not one")
    try:
        manifest = json.loads(path.read_text())
        splits = manifest["splits"]
        fmt, found = manifest.get("format"), manifest.get("kind")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{where}: {MANIFEST} does not parse as a shard manifest ({error})") from None
    if fmt != FORMAT or found != kind:
        raise InputError(f"{where}: {MANIFEST} is format {fmt} of {found!r} shards; expected format {FORMAT} of {kind!r} shards")
    check_sealed(manifest, path, where)  # an edited manifest is refused, naming it
    if not isinstance(splits, dict) or not all(isinstance(s, list) and all({"file", "samples", "bytes", "sha256"} <= set(e) for e in s) for s in splits.values()):
        raise InputError(f"{where}: {MANIFEST}: 'splits' must map each split to a list of shards with file, samples, bytes and sha256")
    return manifest


def check_shard_files(folder: str | Path, manifest: dict[str, Any], split: str, option: str = "--data.shards") -> None:
    """Every shard of ``split`` present with the size the manifest records (a missing or cut-short copy), or :class:`InputError`."""
    shards = manifest["splits"].get(split)
    if not shards:
        raise InputError(f"{option} {folder}: {MANIFEST} lists no {split!r} shards (it has {sorted(manifest['splits'])})")
    for entry in shards:
        path = Path(folder) / entry["file"]
        if not path.is_file():
            raise InputError(f"{option} {folder}: shard {entry['file']} is missing ({MANIFEST} lists it with {entry['samples']} samples)")
        if path.stat().st_size != entry["bytes"]:
            raise InputError(f"{option} {folder}: shard {entry['file']} holds {path.stat().st_size} bytes, {MANIFEST} says {entry['bytes']} (cut short or changed)")


def verify_shard(path: Path, sha256: str, option: str = "--data.shards") -> None:
    """A shard's bytes against its recorded SHA-256, or :class:`InputError` naming it."""
    if sha256_file(path) != sha256:
        raise InputError(f"{option} {path.parent}: shard {path.name} does not match the SHA-256 in {MANIFEST} (altered or damaged); write the shards again")


def balanced(counts: list[int], parts: int) -> list[list[int]]:
    """Indices of ``counts`` dealt to ``parts`` groups with near-equal sums: largest first, each to the lightest group
    (ties: the lower index); each group's indices in ascending order.

    >>> balanced([5, 5, 5, 2], 2)
    [[0, 2], [1, 3]]
    """
    groups: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for index in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        lightest = min(range(parts), key=lambda p: (totals[p], p))
        groups[lightest].append(index)
        totals[lightest] += counts[index]
    return [sorted(group) for group in groups]


@dataclass(frozen=True)
class ShardPlan:
    """Which shards each rank's loader workers read and how many batches each yields.

    ``shards[rank][worker]`` are indices into the split's shard list; ``batches[rank][worker]`` the batches that worker
    yields per epoch; ``samples[rank][worker]`` the samples in them. Under DDP (``world > 1``) a training split
    (``equal``) has every rank yield the smallest rank's batch count (a rank with more takes batches off its busiest
    workers: DDP's backward is collective), so ``skipped`` samples stay unread each epoch (which ones changes with the
    seeded shard order). A validation or test split (``equal=False``) is read whole, each sample by one rank: ranks
    may yield different numbers of batches (nothing collective runs per evaluation batch). One process reads everything.
    """

    shards: list[list[list[int]]]
    batches: list[list[int]]
    samples: list[list[int]]
    total: int

    @classmethod
    def of(cls, counts: list[int], world: int, workers: int, batch_size: int, where: str, equal: bool = True) -> ShardPlan:
        if world > 1 and len(counts) < world:
            need = math.ceil(sum(counts) / world)
            raise InputError(f"{where}: {len(counts)} shard(s) for {world} DDP processes; each process reads shards of its own, so a split needs at "
                             f"least one shard per process: write the shards again with --samples_per_shard at most {need}")  # fmt: skip
        slots = max(1, workers)
        shards = []
        for rank_shards in balanced(counts, world):
            shards.append([[rank_shards[i] for i in group] for group in balanced([counts[i] for i in rank_shards], slots)])
        available = [[sum(counts[i] for i in group) for group in rank] for rank in shards]
        batches = [[math.ceil(n / batch_size) for n in rank] for rank in available]
        fewest = min(sum(rank) for rank in batches)
        for rank in batches if world > 1 and equal else []:
            while sum(rank) > fewest:
                rank[max(range(slots), key=lambda w: (rank[w], -w))] -= 1
        samples = [[min(n, b * batch_size) for n, b in zip(a, bs)] for a, bs in zip(available, batches)]
        return cls(shards, batches, samples, sum(counts))

    @property
    def skipped(self) -> int:
        return self.total - sum(map(sum, self.samples))


def _shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer of ``size`` items: each item out is a random one of those held."""
    held: list[Any] = []
    for item in items:
        held.append(item)
        if len(held) >= size:
            yield held.pop(int(rng.integers(len(held))))
    while held:
        yield held.pop(int(rng.integers(len(held))))


class ShardStream(IterableDataset):
    """One split's shards as whole batches for this process (``rank`` of ``world``): each loader worker reads its shards
    of :class:`ShardPlan` (``workers`` = the loader's), verified when opened, in a seeded order per epoch when
    ``shuffle``, through a shuffle buffer, and yields its planned number of batches (``len``: this rank's total).

    Args:
        folder: the shard folder. shards: the split's manifest entries. decode: one webdataset sample (``__key__`` and
        the fields' bytes) to one item. seed: shard order and shuffle buffer (with the epoch, rank and worker).
        first_epoch: the epoch of the first iteration (a resumed run's); each iteration is the next epoch.
        sample_bytes: the size of one decoded sample, bounding the shuffle buffer to :data:`SHUFFLE_BYTES`.
    """

    def __init__(self, folder: str | Path, shards: list[dict[str, Any]], decode: Callable[[dict[str, Any]], Any], *, rank: int, world: int, workers: int,
                 batch_size: int, shuffle: bool, seed: int, first_epoch: int = 0, sample_bytes: int = 1, where: str = "--data.shards") -> None:  # fmt: skip
        self.folder, self.entries, self.decode, self.rank, self.world = Path(folder), shards, decode, rank, world
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, first_epoch
        self.plan = ShardPlan.of([e["samples"] for e in shards], world, workers, batch_size, where, equal=shuffle)  # shuffled: a training split
        self.buffer = max(batch_size, min(8 * batch_size, SHUFFLE_BYTES // max(1, sample_bytes)))
        self.verified: set[str] = set()  # shards this process has hashed (persistent workers keep theirs across epochs)

    def __len__(self) -> int:
        return sum(self.plan.batches[self.rank])

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        epoch, self.epoch = self.epoch, self.epoch + 1  # each worker's copy counts its own iterations: one per epoch
        try:
            yield from self.batches(info.id if info else 0, epoch)
        except InputError as error:
            if info is None:
                raise
            yield {REFUSED: str(error)}  # an exception raised here would reach the main process wrapped in a traceback

    def shard_order(self, worker: int, epoch: int) -> list[int]:
        """The shards ``worker`` of this rank reads in ``epoch``, in order."""
        mine = self.plan.shards[self.rank][worker] if worker < len(self.plan.shards[self.rank]) else []
        if not self.shuffle:
            return list(mine)
        return [mine[i] for i in np.random.default_rng([self.seed, epoch, self.rank, worker]).permutation(len(mine))]

    def samples_in(self, item: Any) -> int:
        """How many samples a decoded item is (one; a block of rows in :class:`pipelines.row_shards.RowBlockStream`)."""
        return 1

    def samples(self, order: list[int]) -> Iterator[Any]:
        """The decoded samples of shards ``order``, each shard's SHA-256 checked before its first sample is used."""
        import webdataset as wds

        for index in order:
            entry = self.entries[index]
            path = self.folder / entry["file"]
            if entry["file"] not in self.verified:
                verify_shard(path, entry["sha256"])
                self.verified.add(entry["file"])
            count = 0
            for sample in wds.tarfile_samples([{"url": str(path)}]):
                item = self.decode(sample)
                count += self.samples_in(item)
                yield item
            if count != entry["samples"]:  # a manifest that says otherwise would leave this rank short of its batches: a DDP hang
                raise InputError(f"--data.shards {self.folder}: shard {entry['file']} holds {count} samples, {MANIFEST} says {entry['samples']}")

    def batches(self, worker: int, epoch: int) -> Iterator[Any]:
        """What ``worker`` of this rank yields in ``epoch``: its planned number of collated batches."""
        quota = self.plan.batches[self.rank][worker] if worker < len(self.plan.batches[self.rank]) else 0
        if quota == 0:
            return
        items = self.samples(self.shard_order(worker, epoch))
        if self.shuffle:
            items = _shuffled(items, self.buffer, np.random.default_rng([self.seed, epoch, self.rank, worker, 1]))
        batch: list[Any] = []
        for item in items:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield default_collate(batch)
                batch, quota = [], quota - 1
                if quota == 0:
                    return
        if batch:
            yield default_collate(batch)


class ShardLoader(DataLoader):
    """The ``DataLoader`` of a :class:`ShardStream` (batches made by the stream: ``batch_size=None``); a refusal from a
    worker is raised here as the :class:`InputError` it was."""

    def __init__(self, dataset: ShardStream, num_workers: int = 0, pin_memory: bool | None = None, **kwargs: Any) -> None:
        # ``**kwargs``: Lightning builds the loader again with every DataLoader argument (predict tracks batch indices)
        kwargs = {"batch_size": None, "persistent_workers": num_workers > 0, **kwargs}
        super().__init__(dataset, num_workers=num_workers, pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, **kwargs)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            if isinstance(batch, dict) and REFUSED in batch:
                raise InputError(batch[REFUSED])
            yield batch


def describe_plan(stream: ShardStream, split: str) -> str | None:
    """A warning when a DDP plan leaves samples unread each epoch, else ``None``."""
    plan = stream.plan
    if stream.world == 1 or plan.skipped == 0:
        return None
    return (f"--data.shards: the {split} split's {len(stream.entries)} shards give the {stream.world} DDP processes unequal shares; each reads "
            f"{len(stream)} batches per epoch (equal, or DDP would hang), so {plan.skipped} of its {plan.total} samples stay unread each epoch "
            f"({'which ones changes with the seeded shard order' if stream.shuffle else 'the same ones each time: the ends of the fuller ranks'}); "
            f"shards written with --shards_multiple_of {stream.world * max(1, len(plan.shards[0]))} (processes x loader workers) leave fewer than one per process")  # fmt: skip
