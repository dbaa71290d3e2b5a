"""``TransactionDataModule``: transaction tables (CSV/Parquet), ADBench ``.npz`` or the synthetic set.

The source is read and the preprocessing fitted on the training rows when the data module is first asked about the model's input layout (before any
training), so bad input fails fast with an ``InputError`` (a ``ValueError``: the runner exits 2) naming the file, column and rows. The fitted
:class:`TablePreprocessor` is the data module's ``state_dict``: Lightning stores it in every checkpoint and restores it before any split is encoded,
so validation, test and scoring reuse exactly the training-time preprocessing.

Modes and splits (seeded by ``split_seed``):

- ``semi_supervised`` (needs labels): normal rows are split ``train / val / test`` by ``1 - val_fraction - test_fraction / val_fraction /
  test_fraction``; fraud rows never train and are shared between val and test in the ratio ``val_fraction : test_fraction``. With ``val_fraction +
  test_fraction = 0.5`` the union of val and test is ADBench's semi-supervised test set (the other half of the normals plus every anomaly).
- ``unsupervised``: every row may train (labels, if any, only evaluate); the split is stratified by label when there is one.

Scoring (``predict``) streams ``predict_path`` in chunks of ``predict_chunk_rows`` rows (pandas for CSV, pyarrow for Parquet), so a file larger than
memory works; every row comes out with its original values, in order (one file per rank under DDP). Before anything is written the whole scoring file
is read once, chunk by chunk, and every value checked (``setup("predict")``): a bad value in the last chunk refuses the command (exit 2) naming its
row, and no predictions file is written. Each chunk is checked again as it is scored.

Checks on the training source (all before training, :class:`pipelines.errors.InputError`): every column has a role or is listed in ``ignore_columns``
(a column the model silently left out would look used); the label column holds both classes, only ``label_classes``'s two values and no missing label;
the validation and test splits each get normal and fraud rows (AUROC, AUPRC and the best-F1 threshold need both).

Example:
    >>> dm = TransactionDataModule(synthetic_rows=400, **SYNTHETIC_ROLES)
    >>> dm.num_numeric > 0, len(dm.feature_groups) == 11
    (True, True)
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
import pandas as pd
from torch.utils.data import DataLoader

from domains.finance.datasets import EncodedRows, ScoringStream, identity
from domains.finance.data_checkpoint import data_state, restore_data_state, training_reference_of
from domains.finance.preprocessing import ColumnRoles, TablePreprocessor, parse_labels
from domains.finance.shards import FinanceShards
from domains.finance.source_checks import check_both_classes, check_path_options, check_roles_cover, check_scoring_file, check_table_ids
from domains.finance.sources import read_adbench_npz, read_table
from domains.finance.splitting import split_rows
from domains.finance.streaming import NO_STREAMED_PREDICT, StreamedTable, check_streaming_options
from domains.finance.synthetic import make_card_transactions
from pipelines.data import make_loader
from pipelines.grouped_steps import training_loader
from pipelines.errors import InputError
from pipelines.splits import SplitBy, SplitRule

SPLITS = ("train", "val", "test")
#: the column roles of the synthetic set (the defaults in ``config.yaml``)
SYNTHETIC_ROLES: dict[str, Any] = {
    "id_columns": ["transaction_id", "customer_id"],
    "numeric_columns": ["distance_from_home_km", "transactions_last_hour", "customer_age"],
    "amount_columns": ["amount", "seconds_since_previous"],
    "boolean_columns": ["card_present"],
    "timestamp_columns": ["timestamp"],
    "categorical_columns": ["merchant_category", "channel", "country"],
    "label_column": "is_fraud",
}


class TransactionDataModule(pl.LightningDataModule):
    """Transactions for fraud detection as anomaly detection.

    Args:
        path: a CSV or Parquet transaction table (roles below), or an ADBench ``.npz`` (``X``, ``y``;
            every column numeric, the roles are ignored). Default: the embedded synthetic card
            transactions.
        predict_path: a CSV or Parquet file to score with ``predict`` (default: the test split). It
            must have the training table's columns (the label column and ``ignore_columns`` are optional).
        id_columns: identifier columns, dropped from the features (kept in the scored output).
        numeric_columns: numeric columns (median-imputed, robustly scaled: median / IQR, compressed beyond 50 robust sd).
        amount_columns: heavy-tailed amounts: ``sign(x) log1p(|x|)``, then as numeric.
        boolean_columns: true/false columns.
        timestamp_columns: timestamps, turned into hour-of-day and day-of-week features.
        categorical_columns: categorical columns (vocabulary with an ``<unknown>`` slot).
        ignore_columns: columns of the table the model must not use (kept in the scored output). Any
            other column without a role is refused, so that no column is left out unnoticed.
        label_column: the fraud label column (optional in ``unsupervised`` mode).
        label_classes: the label's two values, ``[normal, fraud]``.
        categorical_encoding: ``onehot`` or ``embedding`` (learned embeddings, softmax reconstruction).
        max_categories: most frequent values kept per categorical column.
        min_category_count: values seen fewer times in training go to ``<unknown>``.
        mode: ``semi_supervised`` (train on normal rows only) or ``unsupervised`` (train on all rows).
        val_fraction: validation share (see the module docstring for how each mode uses it).
        test_fraction: test share.
        split_seed: seed of the split (and the hash salt of ``split_by hash``).
        split_by: ``random`` (default, above), ``hash`` (of ``split_key``: an account's rows stay
            together, appended rows never move earlier ones), ``time`` (``time_column`` after
            ``test_after`` is test; no future row trains) or ``column`` (``split_column``):
            :mod:`pipelines.splits`. Under a rule other than ``random`` fraud rows follow the rule;
            in ``semi_supervised`` mode those in train are not trained on.
        split_key: the key column of ``split_by hash`` (e.g. an account id).
        split_column: a column naming ``train``/``val``/``test`` per row (selects ``split_by column``).
        time_column: the time column of ``split_by time`` (numbers or ISO 8601 times).
        test_after: rows with a later time are test (default: the latest ``test_fraction`` of rows).
        val_after: rows with a later time, up to ``test_after``, are val (default: the latest
            ``val_fraction`` of the rows before ``test_after``).
        synthetic_rows: size of the synthetic set (used when ``path`` is not given).
        synthetic_fraud_rate: share of fraud in the synthetic set.
        synthetic_seed: seed of the synthetic generator.
        batch_size: rows per training/evaluation batch (per process under DDP).
        predict_chunk_rows: rows read, encoded and scored at a time by ``predict``.
        num_workers: DataLoader worker processes (persistent when > 0).
        streaming: read ``path`` in chunks of ``predict_chunk_rows`` rows into memory-mapped arrays in ``cache_dir``,
            never as a whole table (:mod:`domains.finance.streaming`: the same splits, fitted state and batches).
        cache_dir: the streaming cache (default ``$XDG_CACHE_HOME/domain-pipelines/finance``, ``~/.cache``).
        shards: a folder of row shards (``python -m domains.finance.shards_write``): the splits and fitted state come from it, each
            DDP process reads only its own shards (:mod:`domains.finance.shards`).
    """

    def __init__(
        self,
        path: str | None = None,
        predict_path: str | None = None,
        id_columns: list[str] | None = None,
        numeric_columns: list[str] | None = None,
        amount_columns: list[str] | None = None,
        boolean_columns: list[str] | None = None,
        timestamp_columns: list[str] | None = None,
        categorical_columns: list[str] | None = None,
        ignore_columns: list[str] | None = None,
        label_column: str | None = None,
        label_classes: list[str | int | bool] | None = None,
        categorical_encoding: Literal["onehot", "embedding"] = "onehot",
        max_categories: int = 50,
        min_category_count: int = 1,
        mode: Literal["semi_supervised", "unsupervised"] = "semi_supervised",
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        split_seed: int = 0,
        split_by: SplitBy = "random",
        split_key: str | None = None,
        split_column: str | None = None,
        time_column: str | None = None,
        test_after: str | None = None,
        val_after: str | None = None,
        synthetic_rows: int = 20000,
        synthetic_fraud_rate: float = 0.02,
        synthetic_seed: int = 0,
        batch_size: int = 256,
        predict_chunk_rows: int = 4096,
        num_workers: int = 0,
        streaming: bool = False,
        cache_dir: str | None = None,
        shards: str | None = None,
    ) -> None:
        super().__init__()
        self.split_rule = SplitRule.from_options(split_by, split_key, split_column, time_column, test_after, val_after, val_fraction, test_fraction, split_seed)
        if batch_size < 1 or predict_chunk_rows < 1:
            raise InputError(f"--data.batch_size and --data.predict_chunk_rows must be >= 1, got {batch_size} and {predict_chunk_rows}")
        if max_categories < 1 or min_category_count < 1:
            raise InputError(f"--data.max_categories and --data.min_category_count must be >= 1, got {max_categories} and {min_category_count}")
        check_path_options(path, predict_path, label_classes)
        check_streaming_options(path, streaming, cache_dir)
        self.save_hyperparameters(logger=False)
        self.preprocessor: TablePreprocessor | None = None
        self._encoded: dict[str, tuple[TablePreprocessor, Any]] = {}  # keyed by the preprocessing in force
        self._checked: set[str] = set()  # what setup has read and checked (setup runs more than once)
        self.shard_set = FinanceShards(shards, self) if shards else None  # checked now; its fitted state taken as a checkpoint's

    # ----- source and split: read before training ---------------------------------------------
    @property
    def is_npz(self) -> bool:
        return bool(self.hparams.path) and str(self.hparams.path).lower().endswith(".npz")

    @cached_property
    def source_name(self) -> str:
        return str(self.hparams.path) if self.hparams.path else "synthetic card transactions"

    @cached_property
    def roles(self) -> ColumnRoles:
        hp = self.hparams
        if self.preprocessor is not None:  # restored from a checkpoint: the source need not be read
            return self.preprocessor.roles
        if self.is_npz:
            columns = [c for c in self.table.columns if c != "label"]
            return ColumnRoles(numeric_columns=columns, label_column="label")
        return ColumnRoles(
            id_columns=list(hp.id_columns or []), numeric_columns=list(hp.numeric_columns or []),
            amount_columns=list(hp.amount_columns or []), boolean_columns=list(hp.boolean_columns or []),
            timestamp_columns=list(hp.timestamp_columns or []), categorical_columns=list(hp.categorical_columns or []),
            label_column=hp.label_column, ignore_columns=list(hp.ignore_columns or []),
        )  # fmt: skip

    @cached_property
    def table(self) -> pd.DataFrame:
        hp = self.hparams
        if hp.path and not Path(hp.path).is_file():
            raise InputError(f"--data.path {hp.path}: file not found" + (" (a folder)" if Path(hp.path).is_dir() else ""))
        if self.is_npz:
            return read_adbench_npz(Path(hp.path))
        if hp.path:
            frame = read_table(Path(hp.path))
        else:
            frame = make_card_transactions(hp.synthetic_rows, hp.synthetic_fraud_rate, hp.synthetic_seed)
        if len(frame) == 0:
            raise InputError(f"{self.source_name}: the table has no rows (only a header); expected one row per transaction")
        return frame

    @cached_property
    def stream(self) -> StreamedTable | None:
        """The chunked reader of ``--data.streaming true`` (:mod:`domains.finance.streaming`), else None."""
        hp = self.hparams
        if not hp.streaming:
            return None
        return StreamedTable(Path(hp.path), self.roles, self.split_rule, hp.mode, self._label_classes, hp.predict_chunk_rows, hp.cache_dir, self.source_name)

    @cached_property
    def labels(self) -> np.ndarray | None:
        """0/1 per row, or None without a label column."""
        roles = self.roles
        if roles.label_column is None:
            return None
        if self.stream is not None:
            return self.stream.labels
        if roles.label_column not in self.table.columns:
            raise InputError(
                f"{self.source_name}: --data.label_column {roles.label_column!r} is missing; the file has columns {list(self.table.columns)} "
                "(without labels: --data.mode unsupervised --data.label_column null)"
            )
        labels = parse_labels(self.table[roles.label_column], self._label_classes, self.source_name)
        check_both_classes(labels, roles.label_column, self._label_classes, self.source_name)
        return labels

    @property
    def _label_classes(self) -> list[Any]:
        return [0, 1] if self.is_npz or self.hparams.label_classes is None else list(self.hparams.label_classes)

    @cached_property
    def split_assignment(self) -> np.ndarray:
        """``train``/``val``/``test`` per row of the source (:func:`domains.finance.splitting.split_rows`)."""
        hp = self.hparams
        if self.stream is not None:
            return np.asarray(SPLITS)[self.stream.split]  # (strings on demand: the stream holds 1-byte codes)
        return split_rows(self.table, self.labels, self.split_rule, hp.mode, self.source_name, hp.val_fraction, hp.test_fraction, hp.split_seed)

    def check_columns(self) -> None:
        """Every column of the training table has a role, is the label, or is listed in ``ignore_columns``."""
        if self.stream is not None:
            check_roles_cover(pd.DataFrame(columns=self.stream.header), self.roles, self.split_rule, self.source_name)
        elif not self.is_npz:
            check_roles_cover(self.table, self.roles, self.split_rule, self.source_name)
            check_table_ids(self.table, self.roles.id_columns, self.source_name)

    def fit_preprocessor(self) -> TablePreprocessor:
        hp = self.hparams
        if self.stream is not None:  # the columns first: the file is scanned (every value checked) by the fit
            self.check_columns()
            try:
                preprocessor = self.stream.fit(hp.categorical_encoding, hp.max_categories, hp.min_category_count)
            except InputError:
                self.stream.discard_if_built()
                raise
        else:
            train = self.split_assignment == "train"
            if hp.mode == "semi_supervised":  # fraud rows in train (a stable rule puts them there) fit nothing
                train &= self.labels == 0
            rows = np.flatnonzero(train)
            self.check_columns()
            preprocessor = TablePreprocessor(self.roles, hp.categorical_encoding, hp.max_categories, hp.min_category_count, self._label_classes)
            preprocessor.check_values(self.table, self.source_name)  # every row, not only the training ones
            preprocessor.fit(self.table.iloc[rows], self.source_name, rows)
        for note in preprocessor.notes:
            rank_zero_info(f"[finance] {self.source_name}: {note}")
        return preprocessor

    @property
    def fitted(self) -> TablePreprocessor:
        """The preprocessing in force: restored from a checkpoint, else fitted on the training split."""
        if self.preprocessor is None:
            self.preprocessor = self.fit_preprocessor()
        return self.preprocessor

    # ----- what the model needs to know (linked by the runner) ---------------------------------
    @property
    def num_numeric(self) -> int:
        return len(self.fitted.numeric_feature_names)

    @property
    def categorical_cardinalities(self) -> list[int]:
        return self.fitted.categorical_cardinalities

    @property
    def feature_groups(self) -> list[str]:
        return self.fitted.group_names

    @property
    def numeric_feature_groups(self) -> list[int]:
        return self.fitted.numeric_feature_groups

    @property
    def categorical_feature_groups(self) -> list[int]:
        return self.fitted.categorical_feature_groups

    # ----- datasets ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Read, fit and check the rows the stage uses before the loop starts (every split for ``fit``;
        the test split for ``test``; for ``predict``, the whole scoring file, and without one the test
        split). With a checkpoint's preprocessing restored, ``predict`` on a scoring file never reads
        the source and ``test`` encodes only its split. Idempotent: the runner calls it before the run
        folder exists, Lightning again later (splits are re-encoded if a checkpoint's preprocessing is
        restored afterwards)."""
        if self.shard_set is not None:
            return self.shard_set.setup(stage)
        scoring_file = bool(self.hparams.predict_path)
        if self.hparams.streaming and stage == "predict" and not scoring_file:
            raise InputError(NO_STREAMED_PREDICT)
        used = {"fit": SPLITS, "validate": ("val",), "test": ("test",), "predict": () if scoring_file else ("test",)}.get(stage or "", SPLITS)
        if used and "columns" not in self._checked:
            self.check_columns()  # (on the checkpoint's roles when restored)
            self._checked.add("columns")
        for name in used:
            if name not in self._checked:
                self._split(name)  # every row of the split is checked now, before the loop
                self._checked.add(name)
        if scoring_file and stage in (None, "predict") and "predict" not in self._checked:
            self.check_scoring_file(Path(self.hparams.predict_path))
            self._checked.add("predict")

    def check_scoring_file(self, path: Path) -> None:
        """The scoring file's columns, then every value of every chunk (:func:`domains.finance.column_checks.check_scoring_file`)."""
        check_scoring_file(path, self.roles, self.split_rule, self.source_name, self._label_classes, self.hparams.predict_chunk_rows, self.preprocessor)

    def _split(self, name: str) -> EncodedRows:
        """The rows of one split encoded with the preprocessing in force (re-encoded after a checkpoint restore)."""
        preprocessor = self.fitted
        cached = self._encoded.get(name)
        if cached is not None and cached[0] is preprocessor:
            return cached[1]
        if self.stream is not None:  # memory-mapped cache files (domains/finance/mapped_rows.py)
            self._encoded[name] = (preprocessor, self.stream.split_rows(name, preprocessor))
            return self._encoded[name][1]
        rows = np.flatnonzero(self.split_assignment == name)
        arrays = preprocessor.transform(self.table.iloc[rows], self.source_name, rows)  # raises naming column and rows
        labels = arrays["label"]
        fit_rows = labels == 0 if self.hparams.mode == "semi_supervised" else np.ones(len(rows), dtype=bool)
        dataset = EncodedRows(arrays, rows, fit_rows)
        self._encoded[name] = (preprocessor, dataset)
        return dataset

    def _loader(self, name: str, shuffle: bool = False, evaluation: bool = False) -> DataLoader:
        hp = self.hparams
        if self.shard_set is not None:
            return self.shard_set.dataloader(name, shuffle)
        return make_loader(
            self._split(name), hp.batch_size, hp.num_workers, evaluation=evaluation, shuffle=shuffle, collate_fn=identity,
            drop_last=shuffle and len(self._split(name)) > hp.batch_size,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        if self.shard_set is not None:
            return self._loader("train", shuffle=True)
        train, hp = self._split("train"), self.hparams  # several batches per step when the task asks (pipelines/grouped_steps.py)
        return training_loader(self.trainer, train, hp.batch_size, hp.num_workers, drop_last=len(train) > hp.batch_size, collate_fn=identity)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", evaluation=True)  # under DDP each sample scored once (pipelines.data.UnpaddedDistributedSampler)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", evaluation=True)

    def predict_dataloader(self) -> DataLoader:
        """Stream ``predict_path`` (or the test split) in chunks, with the checkpoint's preprocessing."""
        hp = self.hparams
        if hp.predict_path:
            stream = ScoringStream(Path(hp.predict_path), str(hp.predict_path), self.fitted, hp.predict_chunk_rows)
        else:
            rows = np.flatnonzero(self.split_assignment == "test")
            stream = ScoringStream(self.table.iloc[rows].reset_index(drop=True), self.source_name, self.fitted, hp.predict_chunk_rows, rows)
        return make_loader(stream, None, hp.num_workers)

    def describe_data(self) -> dict[str, Any]:
        """Split sizes and, when labelled, normal/fraud rows per split (``report.html``, pipelines/report.py)."""
        if self.shard_set is not None:
            return self.shard_set.describe_data()
        split, labels = self.split_assignment, self.labels
        facts: dict[str, Any] = {"source": self.source_name, "splits": {name: int((split == name).sum()) for name in SPLITS}}
        if labels is not None:
            facts["class_balance"] = {name: {"normal": int(((split == name) & (labels == 0)).sum()), "fraud": int(((split == name) & (labels == 1)).sum())} for name in SPLITS}
        return facts

    # ----- fitted state in the checkpoint (domains/finance/data_checkpoint.py) --------------------
    def state_dict(self) -> dict[str, Any]:
        return data_state(self)

    @property
    def reference_statistics(self) -> dict[str, Any]:
        """Drift reference of the training split's preprocessed numeric features (:func:`domains.finance.data_checkpoint.training_reference_of`)."""
        return training_reference_of(self)

    def check_processes(self, processes: int) -> None:
        """Shards too few for ``processes`` DDP processes are refused (the runner asks before anything is written)."""
        if self.shard_set is not None:
            self.shard_set.check_processes(processes)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checkpoint's preprocessing, drift reference and split rule (:func:`domains.finance.data_checkpoint.restore_data_state`)."""
        if self.shard_set is not None:
            self.shard_set.check_checkpoint(state_dict)
        restore_data_state(self, state_dict)

