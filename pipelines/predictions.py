"""Write ``predict`` results to the run folder, streaming batch by batch.

A domain's ``predict_step`` returns a mapping of column name to a batch-first tensor, array or list;
2-D columns are expanded to ``name_0, name_1, ...``.

Files are never overwritten and never half-written: each ``predict`` writes a new file
(``predictions.csv``, then ``predictions-2.csv``, ... or the ``--output`` name, refused when it
exists), streamed into a hidden ``.<name>.partial`` file that is renamed when the last batch is
written; a failed or killed run leaves no file under the final name and deletes its partial file
when it can. The predict's resolved config is numbered like its file (:func:`predict_config_name`)
and written only once the file is complete. The runner runs ``predict`` in one process (:func:`pipelines.hardware.plan_hardware` refuses more); a
Trainer of one's own under DDP gets ``<name>.rank<N>.csv`` per process, written the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


def batch_to_frame(columns: Mapping[str, Any]) -> pd.DataFrame:
    """Flatten a mapping of batch-first columns into a DataFrame (float64 columns are kept float64)."""
    data: dict[str, Any] = {}
    for name, values in columns.items():
        if isinstance(values, torch.Tensor):
            if values.is_floating_point() and values.dtype not in (torch.float32, torch.float64):
                values = values.float()  # half precision: numpy cannot hold bfloat16; float64 stays float64 (times, UTM positions)
            values = values.detach().cpu().numpy()
        if isinstance(values, np.ndarray) and values.ndim == 2:
            data.update({f"{name}_{i}": values[:, i] for i in range(values.shape[1])})
        elif isinstance(values, np.ndarray) and values.ndim > 2:
            raise ValueError(f"prediction column {name!r} has shape {values.shape}; expected 1-D or 2-D per batch")
        else:
            data[name] = list(values) if isinstance(values, Sequence) and not isinstance(values, str) else values
    return pd.DataFrame(data)


def predict_config_name(predictions: Path) -> str:
    """The name of the resolved config of the ``predict`` that writes ``predictions``, beside it in the run
    folder, numbered like it so no predict replaces an earlier one's: ``predictions.csv`` ->
    ``config-predict.yaml``, ``predictions-2.csv`` -> ``config-predict-2.yaml``, ``--output scores.csv`` ->
    ``config-predict-scores.yaml``.

    Example:
        >>> predict_config_name(Path("run/predictions-3.csv"))
        'config-predict-3.yaml'
    """
    stem = predictions.stem
    if stem == "predictions":
        return "config-predict.yaml"
    number = stem.removeprefix("predictions-")
    return f"config-predict-{number if number != stem and number.isdigit() else stem}.yaml"


def prediction_file(run_dir: Path, output: str | None = None) -> Path:
    """The file a new ``predict`` writes: ``output`` (a name inside the run folder, refused when it
    exists) or the first free name of ``predictions.csv``, ``predictions-2.csv``, ...

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> prediction_file(folder).name
        'predictions.csv'
        >>> _ = (folder / "predictions.csv").write_text("x")
        >>> prediction_file(folder).name
        'predictions-2.csv'
    """
    from pipelines.errors import InputError

    if output is not None:
        name = Path(output)
        if name.name != output or not output.endswith(".csv"):
            raise InputError(f"--output {output!r}: expected a bare file name ending in .csv, without a folder (the file is written inside the run folder {run_dir})")
        for taken in (run_dir / name, run_dir / predict_config_name(name)):
            if taken.exists():
                raise InputError(f"--output {output}: {taken} already exists; earlier predictions and their configs are never overwritten, choose another name")
        return run_dir / name
    candidate, number = run_dir / "predictions.csv", 1
    while candidate.exists() or any(run_dir.glob(f"{candidate.stem}.rank*.csv")) or (run_dir / predict_config_name(candidate)).exists():
        number += 1
        candidate = run_dir / f"predictions-{number}.csv"
    return candidate


class CsvPredictionWriter(BasePredictionWriter):
    """Stream prediction batches to a CSV file of the run folder, complete or absent (see the module)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.target = Path(path)
        self.path: Path | None = None
        self.partial: Path | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self.target if trainer.world_size == 1 else self.target.with_name(f"{self.target.stem}.rank{trainer.global_rank}.csv")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path = target
        self.partial = target.with_name(f".{target.name}.partial")
        self.partial.unlink(missing_ok=True)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, Mapping):
            raise TypeError(f"{type(pl_module).__name__}.predict_step must return a mapping of columns, got {type(prediction)}")
        assert self.partial is not None
        frame = batch_to_frame(prediction)
        frame.to_csv(self.partial, mode="a", header=not self.partial.exists(), index=False)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.path is None or self.partial is None:
            return
        if not self.partial.exists():  # no batch at all: an empty file with no header would mislead
            raise ValueError(f"predict produced no rows: {self.path} was not written")
        os.replace(self.partial, self.path)
        if trainer.is_global_zero:
            print(f"[pipelines] predictions written to {self.path}", file=sys.stderr)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.partial is not None:
            self.partial.unlink(missing_ok=True)
