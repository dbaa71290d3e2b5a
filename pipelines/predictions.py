"""Write ``predict`` results to the run folder, streaming batch by batch.

A domain's ``predict_step`` returns a mapping of column name to a batch-first tensor, array or list;
2-D columns are expanded to ``name_0, name_1, ...``. Each process writes its own file under DDP
(``predictions.rank<N>.csv``); a single process writes ``predictions.csv``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


def batch_to_frame(columns: Mapping[str, Any]) -> pd.DataFrame:
    """Flatten a mapping of batch-first columns into a DataFrame."""
    data: dict[str, Any] = {}
    for name, values in columns.items():
        if isinstance(values, torch.Tensor):
            values = values.detach().float().cpu().numpy() if values.is_floating_point() else values.cpu().numpy()
        if isinstance(values, np.ndarray) and values.ndim == 2:
            data.update({f"{name}_{i}": values[:, i] for i in range(values.shape[1])})
        elif isinstance(values, np.ndarray) and values.ndim > 2:
            raise ValueError(f"prediction column {name!r} has shape {values.shape}; expected 1-D or 2-D per batch")
        else:
            data[name] = list(values) if isinstance(values, Sequence) and not isinstance(values, str) else values
    return pd.DataFrame(data)


class CsvPredictionWriter(BasePredictionWriter):
    """Stream prediction batches to CSV in the run folder."""

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.path: Path | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.csv"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / name
        self.path.unlink(missing_ok=True)

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
        assert self.path is not None
        frame = batch_to_frame(prediction)
        frame.to_csv(self.path, mode="a", header=not self.path.exists(), index=False)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.path is not None and trainer.is_global_zero:
            print(f"[pipelines] predictions written to {self.path}")
