"""Sensor windows from row shards (``--data.shards DIR``): what the data module does differently with them.

The shards (written by :mod:`domains.autonomous.shards_write`, format :mod:`pipelines.row_shards`) hold each split's
windows, one row per window with the fields of :class:`~domains.autonomous.windows.WindowDataset`'s items (``past``,
``origin``, ``channels``, ``future``, ``label``, ``time``, the covariates' ``codes``, ``group`` and ``known``, and
``index``, the window's number in its split), in blocks of windows. Windows hold the data's raw values: model inputs are
built on the device from the fitted statistics, as in memory. The manifest holds the data module's fitted state (input
scaling, classes, time step, drift reference, covariate vocabularies and groups, split rule: the checkpoint's
``state_dict``), each window's segment name, and the options the writer read the source with (task, columns, window
lengths...); a run from the shards takes them as a checkpoint's and reads no source. Each DDP process reads only its own
shards.
"""

from __future__ import annotations

import json
from typing import Any

from domains.autonomous import SPEC
from pipelines.errors import InputError
from pipelines.row_shards import RowShards, class_defaults, config_defaults
from pipelines.splits import SplitRule

KIND = "autonomous windows"
WRITER = "domains.autonomous.shards_write"
#: options that name another source or way of reading it: refused beside --data.shards
OTHER_SOURCES = ("path", "eth_ucy_root", "streaming", "cache_dir")
#: options a run from shards may set (they do not change what the shards hold); every other one is the writer's
RUN_OPTIONS = ("predict_path", "batch_size", "num_workers", "pin_memory", "chunk_rows", "augment_rotation", "shards", *OTHER_SOURCES)
SPLITS = ("train", "val", "test")
#: fitted state the windows' covariate fields were encoded with: a checkpoint must hold the same
ENCODING_STATE = ("vocabularies", "groups", "known_future_channels", "categorical_channels")


class ShardWindows:
    """One split of a shard set, as the data module's ``datasets[name]`` holds it: its shard entries and window names."""

    def __init__(self, name: str, entries: list[dict[str, Any]], names: list[str]) -> None:
        self.name, self.entries, self.names = name, entries, names

    def __len__(self) -> int:
        return len(self.names)


class WindowShards(RowShards):
    """An autonomous shard folder opened for a ``SensorSequenceDataModule`` (``data_module``, the class; its ``hparams``: the
    writer's options are put in them); :meth:`statistics` gives the data module the manifest's fitted state, as a checkpoint's would be."""

    def __init__(self, folder: str, hparams: Any, data_module: type) -> None:
        super().__init__(folder, hparams, KIND, OTHER_SOURCES, [class_defaults(data_module), config_defaults(SPEC.config)], WRITER)

    def statistics(self, dm: Any) -> dict[str, Any]:
        """The fitted statistics for ``dm``, whose split rule (from the writer's options) must be the manifest's."""
        if dm.split_rule != SplitRule.from_dict(self.state["split_rule"]):
            raise InputError(f"{self.where}: the split rule of the options, {dm.split_rule.describe()}, is not the manifest's; write the shards again")
        self.dm = dm
        return {key: value for key, value in self.state.items() if key != "split_rule"}

    def setup(self, stage: str | None) -> None:
        """The shards of the splits ``stage`` reads, found with their sizes; ``predict`` on ``--data.predict_path`` reads that
        file with the manifest's statistics, else the test split's shards."""
        dm = self.dm
        if stage == "predict" and dm.hparams.predict_path:
            if "predict" not in dm.datasets:
                dm.datasets["predict"] = dm._predict_dataset(dm.hparams.predict_path)
            return
        for name in {"fit": SPLITS, "validate": ("val",), "test": ("test",), "predict": ("test",)}.get(stage or "", SPLITS):
            if name not in dm.datasets:
                dm.datasets[name] = ShardWindows(name, self.split(name), self.manifest["names"][name])

    def dataloader(self, name: str, shuffle: bool) -> Any:
        hp = self.dm.hparams
        return self.loader(name, self.dm.trainer, hp.batch_size, hp.num_workers, hp.pin_memory, shuffle)

    def check_processes(self, processes: int) -> None:
        hp = self.dm.hparams
        self.check_splits_for(processes, [name for name in SPLITS if isinstance(self.dm.datasets.get(name), ShardWindows)], hp.batch_size, hp.num_workers)

    def check_checkpoint(self, state: dict[str, Any]) -> None:
        """A checkpoint whose covariate encoding (vocabularies, groups) is not the shards' would read their codes as other values."""
        differ = [key for key in ENCODING_STATE if key in state and _json(state[key]) != _json(self.state.get(key))]
        if differ:
            raise InputError(f"{self.where}: the checkpoint's {', '.join(differ)} differ from those the shards' windows were encoded with; "
                             "evaluate a checkpoint on shards written from its own training source and options")  # fmt: skip


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
