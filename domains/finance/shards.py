"""Finance transactions from row shards (``--data.shards DIR``): what the data module does differently with them.

The shards (written by :mod:`domains.finance.shards_write`, format :mod:`pipelines.row_shards`) hold each split's
encoded rows, the batch fields of :class:`~domains.finance.datasets.EncodedRows` (``numeric``, ``categorical``,
``label``, ``row``: the row's number in the source, ``fit_row``), in blocks of rows. The manifest holds the data
module's fitted state (the :class:`~domains.finance.preprocessing.TablePreprocessor`, the split rule, the drift
reference: the checkpoint's ``state_dict``), the split sizes and class balance of the report, and the options the
writer read the source with. A run from the shards takes that state as a checkpoint's and reads no source; each DDP
process reads only its own shards. Scoring reads a file (``--data.predict_path``), since shards hold encoded rows, not
the original values a predictions file repeats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from domains.finance import SPEC
from domains.finance.preprocessing import TablePreprocessor
from pipelines.data import default_workers
from pipelines.errors import InputError
from pipelines.reference import KEY as REFERENCE_KEY
from pipelines.row_shards import RowShards, class_defaults, config_defaults
from pipelines.splits import SplitRule

KIND = "finance rows"
WRITER = "domains.finance.shards_write"
#: options that name another source or way of reading it: refused beside --data.shards
OTHER_SOURCES = ("path", "streaming", "cache_dir")
#: options a run from shards may set (they do not change what the shards hold); every other one is the writer's
RUN_OPTIONS = ("predict_path", "batch_size", "predict_chunk_rows", "num_workers", "shards", *OTHER_SOURCES)
SPLITS = ("train", "val", "test")


class FinanceShards(RowShards):
    """A finance shard folder opened for ``dm`` (a ``TransactionDataModule``): its preprocessing, drift reference and split
    rule set from the manifest, as a checkpoint's would be."""

    def __init__(self, folder: str, dm: Any) -> None:
        super().__init__(folder, dm.hparams, KIND, OTHER_SOURCES, [class_defaults(type(dm)), config_defaults(SPEC.config)], WRITER)
        dm.preprocessor = TablePreprocessor.from_state_dict(self.state["preprocessor"])
        dm._reference = self.state[REFERENCE_KEY]
        dm.split_rule = SplitRule.from_dict(self.state["split_rule"])
        dm.__dict__["source_name"] = f"{folder} (shards of {self.manifest['source']})"
        self.dm = dm
        self.ready: set[str] = set()  # the splits (and the scoring file) checked

    def setup(self, stage: str | None) -> None:
        """The shards of the splits ``stage`` reads found with their sizes; ``predict`` checks its scoring file, as from the source."""
        dm = self.dm
        scoring_file = bool(dm.hparams.predict_path)
        if stage == "predict" and not scoring_file:
            raise InputError(f"{self.where}: predict writes each scored row with its original values, and the shards hold encoded rows; "
                             "give the file to score as --data.predict_path")  # fmt: skip
        for name in {"fit": SPLITS, "validate": ("val",), "test": ("test",), "predict": ()}.get(stage or "", SPLITS):
            if name not in self.ready:
                self.split(name)
                self.ready.add(name)
        if scoring_file and stage in (None, "predict") and "predict" not in self.ready:
            dm.check_scoring_file(Path(dm.hparams.predict_path))
            self.ready.add("predict")

    def dataloader(self, name: str, shuffle: bool) -> Any:
        hp = self.dm.hparams
        return self.loader(name, self.dm.trainer, hp.batch_size, default_workers(hp.num_workers), None, shuffle)

    def check_processes(self, processes: int) -> None:
        hp = self.dm.hparams
        self.check_splits_for(processes, sorted(self.ready & set(SPLITS)), hp.batch_size, default_workers(hp.num_workers))

    def describe_data(self) -> dict[str, Any]:
        return {**self.manifest["facts"], "source": self.dm.source_name}

    def check_checkpoint(self, state: dict[str, Any]) -> None:
        """A checkpoint's preprocessing must be the one that encoded the shards (the rows would mean other features)."""
        if "preprocessor" in state and json.dumps(state["preprocessor"], sort_keys=True, default=str) != json.dumps(self.state["preprocessor"], sort_keys=True, default=str):
            raise InputError(f"{self.where}: the checkpoint's preprocessing (columns {state['preprocessor'].get('roles')}) is not the one that encoded "
                             "the shards; evaluate a checkpoint on shards written from its own training source and options")  # fmt: skip
