"""Shared benchmark helpers: a throughput callback, peak memory, a table printer and child-process environments."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]


def child_env(root: Path = ROOT) -> dict[str, str]:
    """Environment for a ``pipelines.run`` child process importing the code under ``root``: W&B
    offline unless set, and none of this process's W&B service or run folder inherited."""
    env = {**os.environ, "PYTHONPATH": str(root), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    env.pop("WANDB_SERVICE", None)
    env.pop("PIPELINES_RUN_ID", None)
    return env


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (dict, tuple or tensor batches; a group of
    mini-batches, ``pipelines.grouped_steps.BatchGroup``, counts all of them)."""
    batch = getattr(batch, "rows", batch)
    while isinstance(batch, (dict, list, tuple)):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(batch)


class TrainingThroughput(pl.Callback):
    """Record training samples/s per epoch into a JSON file: from the epoch start to its last
    training batch (data loading included, validation excluded), and the share of that time spent
    between steps (fetching the next batch, copying it to the device, hooks), in which no training
    step was being launched.

    Pass it to any run: ``--trainer.callbacks+=benchmarks.common.TrainingThroughput
    --trainer.callbacks.output=throughput.json``.
    """

    def __init__(self, output: str) -> None:
        self.output = Path(output)
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._samples, self._between = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._between += time.perf_counter() - self._last

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += batch_size_of(batch)
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = self._last - self._start
        self.epochs.append(
            {"seconds": seconds, "samples": self._samples, "samples_per_s": self._samples / seconds, "between_steps_share": self._between / seconds}
        )
        if trainer.is_global_zero:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text(json.dumps(self.epochs))


def peak_rss_mib() -> float:
    """Peak resident memory of this process and its finished children, MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def require(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"{path} is absent: the benchmark needs ../shared/data beside the project (see its README)")
    return path


def print_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(lines)
    print(text, flush=True)  # flushed: forked helper processes must not inherit (and repeat) it
    return text


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"results written to {path}")
    return path
