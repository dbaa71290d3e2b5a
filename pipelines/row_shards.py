"""Shards of table-like samples: blocks of rows, each a dict of equally long arrays (finance's encoded transactions,
autonomous's windows), on top of :mod:`pipelines.shards`.

One tar sample of a row shard is a block of at most ``block_rows`` consecutive rows: one ``<field>.npy`` member per
array (no pickle), so that a row costs its bytes and not a tar header. The manifest counts rows (``samples``), so that
:class:`~pipelines.shards.ShardPlan` balances ranks by rows, every rank draws the same number of training batches and
every validation or test row is read by one rank.

- :func:`add_rows`: a split's arrays (or a chunk of them) into the writer, blocks cut at shard ends.
- :class:`RowBlockStream`: the :class:`~pipelines.shards.ShardStream` of a row split: each loader worker concatenates
  the blocks of its shards and cuts batches of ``batch_size`` rows (dicts of tensors, the ones an in-memory dataset of the
  same arrays gives through ``default_collate`` or ``__getitems__``); a training split goes through a shuffle buffer of
  rows (seeded by run, epoch, rank and worker). Without shuffling, one process reads the rows in the written order, so
  its batches are the in-memory sequential loader's.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import default_collate

from pipelines.errors import InputError
from pipelines.data import default_workers
from pipelines.grouped_steps import BatchGroup, group_size, max_train_batches, planned_group_size
from pipelines.shards import ShardLoader, ShardPlan, ShardSetWriter, ShardStream, check_shard_files, describe_plan, npy_array, npy_bytes, read_manifest

log = logging.getLogger(__name__)

#: rows in one tar sample (a block) at most
BLOCK_ROWS = 256


def rows_of(block: Mapping[str, Any]) -> int:
    return len(next(iter(block.values())))


def encode_block(arrays: Mapping[str, Any]) -> dict[str, bytes]:
    """A block's arrays as ``<field>.npy`` members; a field name with a dot (webdataset's key separator) is refused."""
    dotted = [name for name in arrays if "." in name]
    if dotted:
        raise ValueError(f"row shards: field names may not contain a dot: {dotted}")
    return {f"{name}.npy": npy_bytes(np.asarray(value)) for name, value in arrays.items()}


def decode_block(sample: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A tar sample back to its arrays (``__key__`` and other members left out)."""
    return {name[:-4]: npy_array(data) for name, data in sample.items() if name.endswith(".npy")}


def add_rows(writer: ShardSetWriter, arrays: Mapping[str, Any], first: int, block_rows: int = BLOCK_ROWS) -> None:
    """The rows ``arrays`` (dict of arrays, rows first) into the split begun last, as blocks of at most ``block_rows`` that
    never cross a shard's end; ``first`` is the position of their first row in the split (the blocks' keys)."""
    arrays = {name: np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value) for name, value in arrays.items()}
    count, position = rows_of(arrays), 0
    lengths = {name: len(value) for name, value in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"row shards: the arrays of a block differ in length: {lengths}")
    while position < count:
        take = min(block_rows, writer.room(), count - position)
        if take < 1:
            raise ValueError("row shards: more rows than the split was begun with")
        writer.add(f"{first + position:012d}", encode_block({name: value[position : position + take] for name, value in arrays.items()}), samples=take)
        position += take


def _concatenated(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}  # (a copy: the loaded arrays are read-only)


def _tensors(block: dict[str, np.ndarray], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(value[start:stop]) for name, value in block.items()}


def _row_slice(block: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows ``start:stop`` of a block, kept for the next buffer."""
    return {name: value[start:stop] for name, value in block.items()}


class RowBlockStream(ShardStream):
    """A :class:`~pipelines.shards.ShardStream` whose items are blocks of rows (``decode``: a tar sample to a dict of
    arrays, :func:`decode_block` and whatever the domain adds); batches are ``batch_size`` rows, the shuffle buffer
    (:attr:`buffer`) counts rows (``sample_bytes``: the bytes of one row)."""

    def samples_in(self, item: Any) -> int:
        return rows_of(item)

    def batches(self, worker: int, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """What ``worker`` of this rank yields in ``epoch``: its planned number of batches, the last one maybe short."""
        quota = self.plan.batches[self.rank][worker] if worker < len(self.plan.batches[self.rank]) else 0
        if quota == 0:
            return
        size = self.batch_size
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 1]) if self.shuffle else None
        held: list[dict[str, np.ndarray]] = []
        count = 0
        blocks = self.samples(self.shard_order(worker, epoch))
        while True:
            block = next(blocks, None)
            if block is not None:
                held.append(block)
                count += rows_of(block)
                if count < (self.buffer if rng is not None else size):
                    continue
            if count == 0:
                return
            merged = _concatenated(held)
            if rng is not None:
                merged = {name: value[order] for order in (rng.permutation(count),) for name, value in merged.items()}
            cut = count if block is None else count - count % size  # the end: the short last batch too
            for start in range(0, cut, size):
                yield _tensors(merged, start, min(start + size, cut))
                quota -= 1
                if quota == 0:
                    return
            held, count = ([_row_slice(merged, cut, count)] if cut < count else []), count - cut
            if block is None:
                return



def option_defaults(data_module: type, config: Path | None = None) -> dict[str, Any]:
    """What a run that names no option gets: the data module's ``__init__`` defaults, then the ``data:`` section of the
    domain's ``config.yaml`` (the runner's defaults)."""
    return class_defaults(data_module) | (config_defaults(config) if config is not None else {})


def class_defaults(data_module: type) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(data_module.__init__).parameters.items() if p.default is not p.empty}


def config_defaults(config: Path) -> dict[str, Any]:
    return (yaml.safe_load(config.read_text()) or {}).get("data") or {}


class RowShards:
    """A row shard folder for one data module, checked when opened: the manifest is of ``kind``; no other source is named
    beside it (``other_sources``); every option the writer's read, split and fit depended on (the manifest's ``options``)
    is the writer's value or a default (``defaults``: the class's, the domain config's); those values are then put in the data module's ``hparams``, so that the
    run (and its checkpoint) describes the data it reads. ``state`` is the data module's fitted state, as the writer
    fitted it on the training split (a checkpoint's ``state_dict``)."""

    def __init__(self, folder: str, hparams: Any, kind: str, other_sources: tuple[str, ...], defaults: list[dict[str, Any]], writer: str) -> None:
        self.folder, self.where = Path(folder), f"--data.shards {folder}"
        given = [f"--data.{name}" for name in other_sources if hparams.get(name)]
        if given:
            raise InputError(f"{self.where}: the shards are the data (split, encoded and fitted by the writer); drop {' and '.join(given)}")
        self.manifest = read_manifest(self.folder, kind)
        self.state: dict[str, Any] = self.manifest["state"]
        written = self.manifest.get("options") or {}
        differ = [f"--data.{name} {json.dumps(hparams.get(name))} (the shards: {json.dumps(value)})" for name, value in written.items()
                  if _plain(hparams.get(name)) not in [_plain(value)] + [_plain(d[name]) for d in defaults if name in d]]  # fmt: skip
        if differ:
            raise InputError(f"{self.where}: {', '.join(differ)}: the shards hold the source as the writer read, split and encoded it, so these "
                             f"options cannot change it here; drop them, or write the shards again with them (python -m {writer})")  # fmt: skip
        hparams.update(written)
        self.hparams = hparams

    def split(self, name: str) -> list[dict[str, Any]]:
        """A split's shard entries, each found with its recorded size (SHA-256s are checked when a loader opens them)."""
        check_shard_files(self.folder, self.manifest, name)
        return self.manifest["splits"][name]

    def rows(self, name: str) -> int:
        return sum(e["samples"] for e in self.manifest["splits"].get(name) or [])

    def check_splits_for(self, processes: int, splits: list[str], batch_size: int, workers: int) -> None:
        """Each of ``splits`` must give ``processes`` DDP processes shards of their own (:class:`ShardPlan`)."""
        for name in splits:
            ShardPlan.of([e["samples"] for e in self.split(name)], processes, workers, batch_size, f"{self.where} ({name} split)")

    def check_groups(self, groups: int, workers: int) -> None:
        """Refuse training groups of ``groups`` mini-batches (``--model.batches_per_step``) read by ``workers`` loader workers:
        each worker's stream ends on a short batch, so a group could hold one inside it."""
        if groups > 1 and workers > 1:
            raise InputError(f"{self.where}: --model.batches_per_step {groups} with --data.num_workers {workers}: each loader worker ends on a short "
                             "batch, and a group with one inside would train fewer mini-batches on one rank than on another; use "
                             "--data.num_workers 1 (or 0) or --model.batches_per_step 1")  # fmt: skip

    def loader(self, name: str, trainer: Any, batch_size: int, workers: int, pin_memory: bool | None, shuffle: bool) -> ShardLoader:
        """The loader of split ``name`` for this process (its rank's shards under DDP): batches of ``batch_size`` rows; for
        training, groups of them when the task trains several mini-batches per step (:class:`GroupedShardLoader`)."""
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        module = trainer.lightning_module if trainer is not None else None
        groups = group_size(module) if shuffle and module is not None else 1
        self.check_groups(groups, workers)
        fields = self.manifest["fields"]
        row_bytes = sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for dtype, shape in fields.values())
        stream = RowBlockStream(self.folder, self.split(name), decode_block, rank=rank, world=world, workers=workers, batch_size=batch_size,
                                shuffle=shuffle, seed=torch.initial_seed(), first_epoch=trainer.current_epoch if trainer is not None else 0,
                                sample_bytes=row_bytes, where=f"{self.where} ({name} split)")  # fmt: skip
        warning = describe_plan(stream, name)
        if warning and rank == 0:
            log.warning(warning)
        if groups > 1:
            return GroupedShardLoader(stream, workers, pin_memory, groups=groups, max_batches=max_train_batches(trainer))
        return ShardLoader(stream, workers, pin_memory)


def check_grouped_shards(module: Any, datamodule: Any, trainer_options: Any, checkpoint_every_n_steps: int | None = None) -> None:
    """The runner's check before the run folder exists: a fit of ``module`` (its ``batches_per_step``) on ``datamodule``'s
    row shards (``--data.shards``) with several loader workers is refused (:meth:`RowShards.check_groups`) unless its
    trainer options make it train one mini-batch per step anyway (:func:`~pipelines.grouped_steps.planned_group_size`)."""
    shards = getattr(datamodule, "shard_set", None)
    if not isinstance(shards, RowShards):
        return
    hparams = getattr(module, "hparams", {})
    groups = planned_group_size(int(hparams.get("batches_per_step", 1) or 1), trainer_options, checkpoint_every_n_steps)
    shards.check_groups(groups, default_workers(shards.hparams.get("num_workers")))


class GroupedShardLoader(ShardLoader):
    """A training :class:`~pipelines.shards.ShardLoader` handing out :class:`~pipelines.grouped_steps.BatchGroup` s of
    ``groups`` consecutive batches (``--model.batches_per_step``): the batches the plain loader gives, in its order, so
    that the optimizer steps are the one-batch-per-step loop's; ``max_batches`` (``--trainer.limit_train_batches`` as a
    number) counts mini-batches. With at most one loader worker only a rank's last batch is short, the last of its last
    group, so every rank takes the same optimizer steps."""

    def __init__(self, dataset: RowBlockStream, num_workers: int = 0, pin_memory: bool | None = None, groups: int = 1,
                 max_batches: int | None = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(dataset, num_workers, pin_memory, **kwargs)
        self.groups, self.max_batches = groups, max_batches

    @property
    def batches(self) -> int:
        """Mini-batches per epoch (this rank's)."""
        return len(self.dataset) if self.max_batches is None else min(len(self.dataset), self.max_batches)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return math.ceil(self.batches / self.groups)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        group: list[dict[str, torch.Tensor]] = []
        taken = 0
        for batch in super().__iter__():
            if taken == self.batches:
                break
            group.append(batch)
            taken += 1
            if len(group) == self.groups:
                yield BatchGroup({key: torch.cat([b[key] for b in group]) for key in group[0]}, self.dataset.batch_size)  # type: ignore[attr-defined]
                group = []
        if group:
            yield BatchGroup({key: torch.cat([b[key] for b in group]) for key in group[0]}, self.dataset.batch_size)  # type: ignore[attr-defined]


def _plain(value: Any) -> Any:
    """An option's value as JSON has it (tuples as lists), for comparing with the manifest's."""
    return json.loads(json.dumps(value, default=str))


def write_split(writer: ShardSetWriter, name: str, dataset: Any, order: np.ndarray, chunk_rows: int = 65536) -> dict[str, list[Any]]:
    """Rows ``order`` of ``dataset`` (``__getitems__``, else its items collated: a dict of tensors) as split ``name``, read in
    chunks of ``chunk_rows``; the fields' dtypes and row shapes (the manifest's ``fields``)."""
    writer.begin(name, len(order))
    fields: dict[str, list[Any]] = {}
    for start in range(0, len(order), chunk_rows):
        indices = order[start : start + chunk_rows].tolist()
        getitems = getattr(dataset, "__getitems__", None)
        arrays = getitems(indices) if getitems is not None else default_collate([dataset[i] for i in indices])
        fields = {key: [str(np.asarray(value).dtype), list(np.asarray(value).shape[1:])] for key, value in arrays.items()}
        add_rows(writer, arrays, start)
    return fields


def writer_main(prog: str, doc: str, data_module: type, config: Path, write: Any, argv: list[str] | None, samples_per_shard: int, unit: str = "rows") -> None:
    """The command line of a domain's row shard writer: ``--output DIR [--samples_per_shard N] [--shards_multiple_of K]
    --data.X ...`` (the data module's options, defaulting to the domain's ``config.yaml`` as a run does); ``write(data,
    output, samples_per_shard, multiple_of)`` writes and returns the manifest; ``unit``: what a row is. Bad input: one paragraph, exit 2."""
    import sys

    from jsonargparse import ArgumentParser

    from pipelines.errors import EXIT_BAD_INPUT, paragraph
    from pipelines.messages import show_messages

    show_messages()
    try:
        parser = ArgumentParser(prog=prog, description=doc.split("\n\n")[0], exit_on_error=False)
        parser.add_argument("--output", type=str, required=True, help="the shard folder to write (must not exist)")
        parser.add_argument("--samples_per_shard", type=int, default=samples_per_shard, help=f"the most {unit} a tar shard holds (a split's shards differ by at most one)")
        parser.add_argument("--shards_multiple_of", type=int, default=1, help="make each split's shard count a multiple of this: the DDP processes x loader "
                            "workers that will read it, so that each gets an equal share")  # fmt: skip
        parser.add_class_arguments(data_module, "data")
        parser.set_defaults({f"data.{name}": value for name, value in option_defaults(data_module, config).items() if name in inspect.signature(data_module.__init__).parameters})
        try:
            args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        except Exception as error:  # jsonargparse's ArgumentError: an unknown or ill-typed option
            raise InputError(str(error).splitlines()[0]) from None
        manifest = write(args.data.as_dict(), args.output, args.samples_per_shard, args.shards_multiple_of)
    except InputError as error:
        print(paragraph(str(error)), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    counts = {split: f"{sum(e['samples'] for e in shards)} {unit} in {len(shards)} shards" for split, shards in manifest["splits"].items()}
    print(f"shards written to {args.output}: " + "; ".join(f"{split} {text}" for split, text in counts.items()))
