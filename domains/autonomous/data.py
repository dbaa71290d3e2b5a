"""``SensorSequenceDataModule``: windows of sensor sequences for forecasting, regression or classification.

Sources (one is used): a long CSV/TSV/Parquet table (``path``), the ETH/UCY benchmark
(``eth_ucy_root`` + ``eth_ucy_scene``, leave-one-scene-out) or, by default, the embedded vehicle
simulator (:mod:`domains.autonomous.simulator`). Every source becomes a long table and goes through
the same checks (:func:`domains.autonomous.readers.build_tracks`): bad input raises
:class:`pipelines.errors.InputError` naming the file, column and row (1-based data row) before
training starts; NaN rows are dropped or filled by ``nan_policy`` and counted in the log; inf and
float32 overflow are refused; one time step for the whole data set (declared, or the median step of
the training tracks) with the sampling rules of :mod:`domains.autonomous.sampling`; time gaps split
a sequence into segments; segments shorter than one window are counted in the log, and refused only
when no window is left (naming the cause: how many tracks, how long).

A sample is a window of ``observe`` rows (plus ``predict`` future rows when forecasting). Model
inputs are built on the device in :meth:`on_after_batch_transfer` from statistics fitted on the
training split only and saved in every checkpoint (:meth:`state_dict`):

- the per-step displacement of each ``target_channels`` column (0 at the first step), divided by
  one isotropic scale (the RMS step length of the training split), so that rotations keep norms;
- the ``channels`` columns, z-scored per channel (per group with ``normalize_by group``);
- covariates (:mod:`domains.autonomous.covariates`): future-known channels, categorical codes.

The checkpointed state also records what a served model needs to read named requests and to time
its answers: the position channels (``position_names``, the ``target_channels``, for every task)
and the sampling interval of the time column (``time_step``, in its units).

Targets: forecasting predicts the future values of ``target_channels`` (the model predicts their
displacements); regression predicts the numeric ``target_column`` at the last observed row (z-scored
with training statistics; a per-sequence value is the same on every row); classification predicts
the class in ``target_column`` at the last observed row.

Example:
    >>> dm = SensorSequenceDataModule(channels=["speed", "yaw_rate", "accel_long", "accel_lat"], target_channels=["x", "y"], sim_vehicles=40)
    >>> dm.task, dm.input_size, dm.target_dim, dm.observe, dm.predict
    ('forecasting', 6, 2, 8, 12)
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

import lightning.pytorch as pl
import pandas as pd
import torch
from torch.utils.data import DataLoader

from pipelines.data import make_loader
from pipelines.grouped_steps import BatchGroup, training_loader
from pipelines.errors import InputError
from pipelines.splits import SplitBy, SplitRule
from domains.autonomous.fitted_state import fit_class_names, fit_data_statistics
from domains.autonomous.options import check_data_options
from domains.autonomous.covariates import column_roles, covariate_tensors, fit_vocabularies
from domains.autonomous.data_checkpoint import data_state, restore_data_state
from domains.autonomous.readers import SPLITS, ColumnSpec, Tracks, log
from domains.autonomous.shards import ShardWindows, WindowShards
from domains.autonomous.inputs import model_inputs
from domains.autonomous.position_units import KEY as STEP_SCALE_KEY, check_split_units
from domains.autonomous.predict_data import predict_dataset, streamed_predict_dataset
from domains.autonomous.sources import resolve_path, source_tables, split_tracks
from domains.autonomous.streaming import MappedWindows, StreamedTable, check_streaming_options
from domains.autonomous.windows import WindowDataset, Windows, check_split_windows, cut_split_windows, window_starts, window_tensors

Task = Literal["forecasting", "regression", "classification"]


class SensorSequenceDataModule(pl.LightningDataModule):
    """Windows of long-format sensor sequences.

    Args:
        path: a long table (``.csv``, ``.tsv``, ``.parquet``): one row per (sequence, time).
        eth_ucy_root: the ETH/UCY folder (``<root>/<scene>/{train,val,test}/*.txt``, rows ``frame ped x y``);
            its columns are ``sequence``, ``time`` (frame), ``x`` and ``y``.
        eth_ucy_scene: the held-out scene: ``eth``, ``hotel``, ``univ``, ``zara1`` or ``zara2``.
        predict_path: a long table to run ``predict`` on (windows of ``observe`` rows; no target
            needed); default: the test split.
        task: ``forecasting`` (future ``target_channels``), ``regression`` or ``classification``
            (``target_column`` at each window's last observed row).
        sequence_column: the sequence id column.
        time_column: the time or frame column (numeric, sorted within each sequence).
        channels: sensor columns fed to the model as values (z-scored).
        target_channels: columns fed to the model as per-step displacements; forecasting predicts them.
        target_column: the regression or classification target column.
        class_names: the class list in index order (default: the sorted values of the training split).
        observe: rows observed per window.
        predict: future rows predicted per window (forecasting only).
        stride: rows between the starts of consecutive windows.
        time_step: the sampling step of the time column, one for the whole data set (default: the
            median step between consecutive rows of all training tracks); saved in the checkpoint,
            and val, test and predict files must match it.
        time_jitter: how far a step may be from ``time_step``, as a fraction of it (0.1: +-10 %);
            a track sampled at another rate, or in another time unit, and a step that is neither
            regular nor a gap are refused (:mod:`domains.autonomous.sampling`).
        max_gap: consecutive rows further apart than ``max_gap * time_step`` start a new segment
            (a gap: the track is split there); must exceed ``1 + time_jitter``. Default 1.9: a gap is
            at least one missing sample, and a step between ``1 + time_jitter`` and ``max_gap`` steps
            (e.g. alternating 0.07/0.13 s steps in 0.1 s data) is refused as irregular.
        nan_policy: rows with a NaN in a used column: ``drop``, ``ffill`` (last value, per sequence)
            or ``interpolate`` (linear, per sequence); unfillable rows are dropped.
        split_by: ``random`` (default: a seeded split of whole sequences with ``val_fraction`` and
            ``test_fraction``), ``hash`` (of ``split_key``, default the sequence column: stable when
            rows are added, a key's rows together), ``time`` (rows of ``time_column`` after
            ``test_after`` are test, after ``val_after`` val; or the latest fractions: nothing
            later trains; a sequence crossing a cutoff is cut there) or ``column``: :mod:`pipelines.splits`.
        split_key: the key column of ``split_by hash`` (default: ``sequence_column``; e.g. a vehicle id).
        split_column: a column with ``train``/``val``/``test`` per row (case and spaces ignored; any
            other value is refused); selects ``split_by column``.
        test_after: ``split_by time``: rows with a later time are test.
        val_after: ``split_by time``: rows with a later time, up to ``test_after``, are val.
        val_fraction: validation share of sequences in a random or hash split (of rows in a time split).
        test_fraction: test share, likewise.
        split_seed: seed of the random split (the hash salt of ``split_by hash``).
        canonical_heading: express each window's displacements in its own heading frame (the
            observed heading, first to last observed position, along +x), so that the model is
            rotation invariant; predictions are rotated back (2 target channels only).
        augment_rotation: rotate each training window by a random angle (2 target channels only,
            e.g. x/y positions; the other channels are left as they are).
        known_future_channels: forecasting: numeric columns known over the horizon (the decoder reads their future):
            :mod:`domains.autonomous.covariates`.
        categorical_channels: text columns, embedded (:mod:`domains.autonomous.categorical`).
        group_column: ``normalize_by group``: statistics per value of this column (:mod:`domains.autonomous.group_scaling`).
        normalize_by: ``global`` or ``group``.
        sim_vehicles: episodes of the embedded simulator (used when no path is given).
        sim_steps: samples per simulated episode.
        sim_dt: sampling period of the simulator, in seconds.
        sim_seed: seed of the simulator.
        sim_dropout: probability that a simulated row loses its IMU channels (NaN).
        batch_size: windows per batch (per process under DDP).
        num_workers: DataLoader worker processes (persistent when > 0).
        pin_memory: pin host memory for GPU copies (default: when CUDA is available).
        streaming: read ``path`` in chunks of ``chunk_rows`` rows into memory-mapped arrays in ``cache_dir``, never as a
            whole table (rows grouped by sequence): :mod:`domains.autonomous.streaming`; ``predict_path`` likewise.
        cache_dir: the streaming cache's folder (default ``$XDG_CACHE_HOME/domain-pipelines/autonomous``).
        chunk_rows: rows read at a time by ``streaming``.
        shards: a folder of window shards (``python -m domains.autonomous.shards_write``): the splits, statistics and data options
            come from it, each DDP process reads only its own shards (:mod:`domains.autonomous.shards`).
    """

    def __init__(
        self,
        path: str | None = None,
        eth_ucy_root: str | None = None,
        eth_ucy_scene: str = "eth",
        predict_path: str | None = None,
        task: Task = "forecasting",
        sequence_column: str = "sequence",
        time_column: str = "time",
        channels: list[str] | None = None,
        target_channels: list[str] | None = None,
        target_column: str | None = None,
        class_names: list[str] | None = None,
        observe: int = 8,
        predict: int = 12,
        stride: int = 1,
        time_step: float | None = None,
        time_jitter: float = 0.1,
        max_gap: float = 1.9,
        nan_policy: Literal["drop", "ffill", "interpolate"] = "drop",
        split_column: str | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        split_by: SplitBy = "random",
        split_key: str | None = None,
        test_after: str | None = None,
        val_after: str | None = None,
        canonical_heading: bool = False,
        augment_rotation: bool = False,
        known_future_channels: list[str] | None = None,
        categorical_channels: list[str] | None = None,
        group_column: str | None = None,
        normalize_by: Literal["global", "group"] = "global",
        sim_vehicles: int = 400,
        sim_steps: int = 40,
        sim_dt: float = 0.25,
        sim_seed: int = 0,
        sim_dropout: float = 0.003,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        streaming: bool = False,
        cache_dir: str | None = None,
        chunk_rows: int = 100_000,
        shards: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.shard_set = WindowShards(shards, self.hparams, type(self)) if shards else None  # checked now; the writer's options put in hparams
        check_data_options(self.hparams)  # every option's value, before anything is read or written
        check_streaming_options(self.hparams)
        key = (split_key or sequence_column) if split_by == "hash" else split_key
        self.split_rule = SplitRule.from_options(split_by, key, split_column, time_column, test_after, val_after, val_fraction, test_fraction, split_seed)
        if eth_ucy_root and self.split_rule.by != "random":
            raise InputError(f"--data.eth_ucy_root keeps ETH/UCY's own leave-one-scene-out split; {self.split_rule.describe()} applies to --data.path tables")
        self.datasets: dict[str, WindowDataset] = {}
        self.stats: dict[str, Any] | None = self.shard_set.statistics(self) if self.shard_set is not None else None  # as a checkpoint's

    # ----- what the model needs to know, read before training -------------------------------
    @property
    def columns(self) -> ColumnSpec:
        hp = self.hparams
        channels, text, roles = column_roles(hp)
        return ColumnSpec(
            hp.sequence_column, hp.time_column, channels, list(hp.target_channels or []),
            hp.target_column if hp.task != "forecasting" else None, hp.task == "regression", text, roles,
        )  # fmt: skip

    @property
    def task(self) -> str:
        return self.hparams.task

    @property
    def observe(self) -> int:
        return self.hparams.observe

    @property
    def predict(self) -> int:
        """Future rows per window (0 unless forecasting)."""
        return self.hparams.predict if self.task == "forecasting" else 0

    @property
    def target_dim(self) -> int:
        return len(self.hparams.target_channels or [])

    @property
    def target_names(self) -> list[str]:
        """Names of the forecast channels, or of the target column."""
        return list(self.hparams.target_channels or []) if self.task == "forecasting" else [self.hparams.target_column]

    @property
    def position_names(self) -> list[str]:
        """Names of the position channels (``target_channels``), fed as displacements for every task."""
        return list(self.hparams.target_channels or [])

    @property
    def time_step(self) -> float:
        """The sampling interval in the time column's units, one for the whole data set: ``data.time_step``,
        or the median step of the training tracks (the simulator's ``sim_dt``; 10 frames for ETH/UCY); a
        checkpoint's, once restored (every split is then checked against it)."""
        if self.stats and self.stats.get("time_step"):
            return float(self.stats["time_step"])
        return float(self.tracks["train"].report["time_step"])

    @property
    def input_size(self) -> int:
        """Columns of the model's ``inputs``: displacements, channels, future-known channels' past, categorical codes."""
        return self.target_dim + len(self.columns.channels) + len(self.hparams.categorical_channels or [])

    @property
    def known_size(self) -> int:
        """Future-known covariates the decoder reads per future step."""
        return len(self.hparams.known_future_channels or [])

    @property
    def categories(self) -> list[int]:
        """Codes per categorical channel: its training vocabulary (the checkpoint's, once restored) + the unknown bucket."""
        vocabularies = (self.stats or {}).get("vocabularies") or (fit_vocabularies(self.tracks["train"], self.hparams) if self.hparams.categorical_channels else {})
        return [len(vocabularies[c]) + 1 for c in self.hparams.categorical_channels or []]

    @property
    def input_channel_names(self) -> list[str]:
        """Names of the ``inputs`` columns after the displacements (for attributions)."""
        return [*self.columns.channels, *(self.hparams.categorical_channels or [])]

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.task == "classification" else 0

    @cached_property
    def tables(self) -> dict[str, pd.DataFrame]:
        """The source as one long table per split (validated later, in :attr:`tracks`)."""
        return source_tables(self.hparams, self.columns, self.split_rule)

    @cached_property
    def tracks(self) -> dict[str, Tracks]:
        """Validated, NaN-handled, gap-split segments of each split (the NaN and gap counts are logged)."""
        hp = self.hparams
        step = hp.time_step if hp.time_step is not None else (self.stats or {}).get("time_step")  # None: inferred from the training tracks, then used for every split
        return self.streamed.tracks(step) if hp.streaming else split_tracks(self.tables, self.columns, hp, step)

    @cached_property
    def streamed(self) -> StreamedTable:
        """``--data.streaming true``: the table read in chunks into memory-mapped splits."""
        return StreamedTable(resolve_path(self.hparams.path), self.columns, self.hparams, self.split_rule)

    @cached_property
    def class_names(self) -> list[str]:
        if self.task != "classification":
            return []
        if self.stats and self.stats.get("class_names"):  # a checkpoint's: the data is read against them
            return list(self.stats["class_names"])
        return fit_class_names(self.tables, self.tracks["train"], self.hparams.target_column, self.hparams.class_names)

    @cached_property
    def windows(self) -> dict[str, Windows]:
        """Window rows of every split; refused when no track of the data set, or of one split, is long enough."""
        hp = self.hparams
        if not hp.streaming:
            return cut_split_windows(self.tracks, self.tables, self.observe, self.predict, hp.stride, hp.max_gap)
        cut = {name: window_starts(tracks, self.observe + self.predict, hp.stride, self.observe - 1) for name, tracks in self.tracks.items()}
        check_split_windows(cut, self.tracks, dict.fromkeys(cut, [str(self.streamed.path)]), self.observe, self.predict, hp.max_gap)
        return cut

    # ----- statistics fitted on the training split ------------------------------------------
    def fit_statistics(self) -> dict[str, Any]:
        """The state fitted on the training split (:func:`domains.autonomous.fitted_state.fit_data_statistics`)."""
        return fit_data_statistics(self)

    def _tensors(self, tracks: Tracks, windows: Windows, name: str) -> dict[str, torch.Tensor]:
        """A split's window tensors; with fitted statistics also its ``codes``, ``group`` and ``known`` covariates."""
        tensors = window_tensors(tracks, windows, self.observe, self.task, self.class_names, self.hparams.target_column, name)
        return tensors | (covariate_tensors(tracks, windows, self.observe, self.stats, name) if self.stats is not None else {})

    def setup(self, stage: str | None = None) -> None:
        """Windows of every split, checked before the loop starts; ``predict`` on ``predict_path`` with a
        checkpoint's statistics reads only that file, never the source."""
        if self.shard_set is not None:
            return self.shard_set.setup(stage)
        if stage == "predict" and self.hparams.predict_path and self.stats is not None:
            if "predict" not in self.datasets:
                self.datasets["predict"] = self._predict_dataset(self.hparams.predict_path)
            return
        if all(name in self.datasets for name in SPLITS):
            return
        fitted = self.stats is None
        if fitted:
            self.stats = self.fit_statistics()
        check_split_units(self, fitted)  # a track in another length unit (mm among m) against the training scale: position_units.py
        for name in SPLITS:
            tracks, windows = self.tracks[name], self.windows[name]
            if self.hparams.streaming:  # windows read from the maps per item
                self.datasets[name] = MappedWindows(tracks, windows, self._tensors, name, self.streamed.maps)
                continue
            self.datasets[name] = WindowDataset(self._tensors(tracks, windows, name), [tracks.names[s] for s in windows.segment])
        log(", ".join(f"{name}: {len(ds)} windows" for name, ds in self.datasets.items()))
        if self.hparams.predict_path and "predict" not in self.datasets:
            self.datasets["predict"] = self._predict_dataset(self.hparams.predict_path)

    def _predict_dataset(self, path: str) -> WindowDataset:
        """Windows of a new file (:func:`domains.autonomous.predict_data.predict_dataset`), checked against
        the training data's time step (:attr:`time_step`, the one saved in the checkpoint)."""
        step = float(self.stats["time_step"]) if self.stats and self.stats.get("time_step") else self.time_step
        if self.hparams.streaming:
            return streamed_predict_dataset(path, self.columns, self.hparams, step, self._tensors, self.stats.get(STEP_SCALE_KEY))
        return predict_dataset(path, self.columns, self.hparams, step, self.predict if self.known_size else 0, self._tensors, self.stats.get(STEP_SCALE_KEY))

    def _loader(self, name: str, shuffle: bool = False, evaluation: bool = False) -> DataLoader:
        hp = self.hparams
        if isinstance(self.datasets[name], ShardWindows):
            return self.shard_set.dataloader(name, shuffle)  # type: ignore[union-attr]
        return make_loader(self.datasets[name], hp.batch_size, hp.num_workers, hp.pin_memory, evaluation, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        if self.shard_set is not None:
            return self._loader("train", shuffle=True)
        hp = self.hparams  # several batches per step when the task asks (pipelines/grouped_steps.py)
        return training_loader(self.trainer, self.datasets["train"], hp.batch_size, hp.num_workers, hp.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", evaluation=True)  # under DDP each sample scored once (pipelines.data.UnpaddedDistributedSampler)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", evaluation=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if "predict" in self.datasets else "test")

    def window_name(self, index: int) -> str:
        """The segment (sequence id, ``/k`` for the k-th piece after a time gap) of a window of the current loader."""
        trainer = self.trainer
        split = "test"
        if trainer is not None and trainer.predicting:
            split = "predict" if "predict" in self.datasets else "test"
        return self.datasets[split].names[index]

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Build model inputs on the device with the training statistics (and rotate training windows).

        Adds ``inputs`` (B, observe, F), ``displacement_scale`` (B,), for regression ``target_mean`` and
        ``target_std`` (B,), and with ``canonical_heading`` the per-window ``frame`` (B, 2, 2) that the
        model uses to rotate its displacements back to the data's frame. ``past``/``future`` stay in
        the data's frame.
        """
        assert self.stats is not None, "setup() or load_state_dict() must run first"
        if isinstance(batch, BatchGroup):  # prepared one mini-batch at a time, as the task takes it
            return batch.prepared_by(lambda single: self.on_after_batch_transfer(single, dataloader_idx))
        trainer = self.trainer
        training = bool(trainer is not None and trainer.training)
        return model_inputs(batch, self.stats, bool(self.hparams.canonical_heading), bool(self.hparams.augment_rotation and training), training)

    def state_dict(self) -> dict[str, Any]:
        """The statistics fitted on the training split (stored in every checkpoint): :func:`domains.autonomous.data_checkpoint.data_state`."""
        return data_state(self)

    def check_processes(self, processes: int) -> None:
        """Shards too few for ``processes`` DDP processes are refused (the runner asks before anything is written)."""
        if self.shard_set is not None:
            self.shard_set.check_processes(processes)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Use a checkpoint's statistics, checked against this data's: :func:`domains.autonomous.data_checkpoint.restore_data_state`."""
        if self.shard_set is not None:
            self.shard_set.check_checkpoint(state_dict)
        restore_data_state(self, state_dict)
