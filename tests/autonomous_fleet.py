"""The tiny autonomous fleet the bad-input and position-unit tests share: 6 straight trips of 24 rows at
10 Hz (``fleet``), written as CSV, TSV or Parquet (``write``), and the runner options that train a model
on it in a second (``BASE``). The one run trained on it is the fixture ``autonomous_fleet_run``
(``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

DT = 0.1
BASE = (
    "--data.channels=[speed]", "--data.batch_size=8", "--model.hidden_size=8", "--model.embed_size=4", "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
)  # fmt: skip


def fleet(tracks: int = 6, steps: int = 24, dt: float = DT) -> pd.DataFrame:
    """Straight trips sampled every ``dt`` seconds: row ``24 * i + k + 1`` is step ``k`` of ``trip{i}``."""
    k = np.tile(np.arange(steps), tracks)
    i = np.repeat(np.arange(tracks), steps)
    return pd.DataFrame({
        "sequence": [f"trip{n}" for n in i], "time": np.round(k * dt, 6), "x": k * 1.5 + i, "y": 0.1 * k * i,
        "speed": 15.0 + i, "manoeuvre": np.where(i % 2 == 0, "keep", "brake"), "score": 0.5 + 0.1 * i,
    })  # fmt: skip


def write(table: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",")
