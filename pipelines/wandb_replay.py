"""Every epoch of a resumed run reaches W&B once, even when the killed segment's W&B data was lost.

A SIGKILL takes W&B's writer down with the run: the offline file of the killed segment can be cut
to its 7-byte header, so the epochs before the kill survive only in the run folder's
``metrics.jsonl``. :class:`ReplayMetrics`, on a resumed ``fit``, logs to W&B the epoch rows of
``metrics.jsonl`` up to the resumed checkpoint's step whose epoch no earlier segment holds (earlier
offline segments are read back; online, the resumed run's ``epoch`` summary says how far it got).
Rows after the checkpoint are not replayed: the resumed training redoes those epochs. A replayed
row is logged at the step Lightning logs epoch-end metrics at (the epoch's last training batch,
``global_step - 1``) and carries ``replayed=1``.

Use it with the runner (``--trainer.callbacks+=pipelines.wandb_replay.ReplayMetrics``; retraining
adds it when an attempt resumes); it does nothing on a fresh run or without a W&B logger.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

STEP_KEY = "trainer/global_step"
log = logging.getLogger(__name__)
_BLOCK, _HEADER = 32768, 7


def logged_epochs(run_file: Path) -> set[int]:
    """Epochs with validation metrics (a ``val/`` key) in the history of an offline W&B run file (a file
    cut short by a kill is read up to the cut). Format: a 7-byte header, then LevelDB-log records of
    ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    epochs: set[int] = set()
    pending, position = b"", _HEADER
    while position + _HEADER <= len(data):
        room = _BLOCK - position % _BLOCK
        if room < _HEADER:
            position += room
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        chunk = data[position + _HEADER : position + _HEADER + length]
        if len(chunk) < length:
            break  # cut by the kill
        position += _HEADER + length
        if kind == 0 and length == 0:
            position += _BLOCK - position % _BLOCK if position % _BLOCK else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            try:
                record = wandb_internal_pb2.Record.FromString(pending)
            except Exception:  # noqa: BLE001 - a damaged record ends what can be read
                break
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {(item.key or "/".join(item.nested_key)): item.value_json for item in record.history.item}
                if "epoch" in row and any(key.startswith("val/") for key in row):
                    epochs.add(int(json.loads(row["epoch"])))
    return epochs


class ReplayMetrics(pl.Callback):
    """See the module docstring.

    Args:
        run_dir: the run folder holding ``metrics.jsonl`` and ``wandb/`` (default: the trainer's root dir).
    """

    def __init__(self, run_dir: str | None = None) -> None:
        self.run_dir = run_dir

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not trainer.ckpt_path:
            return
        from lightning.pytorch.loggers import WandbLogger

        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        run_dir = Path(self.run_dir or trainer.default_root_dir)
        metrics_file = run_dir / "metrics.jsonl"
        if not loggers or not metrics_file.is_file():
            return
        resumed_at = trainer.global_step
        rows = []
        for line in metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if row.get("stage") == "fit" and int(row.get("step", -1)) <= resumed_at:
                rows.append(row)
        for logger in loggers:
            run = logger.experiment
            seen = self._seen(run, run_dir)
            replayed = 0
            for row in {int(r["epoch"]): r for r in rows}.values():  # the last row of an epoch wins
                if int(row["epoch"]) in seen:
                    continue
                values: dict[str, Any] = {k: v for k, v in row.items() if k not in ("stage", "step")}
                run.log({**values, STEP_KEY: max(int(row["step"]) - 1, 0), "replayed": 1})
                replayed += 1
            if replayed:
                log.info(f"W&B: replayed {replayed} epoch(s) of the interrupted segment from {metrics_file}")

    @staticmethod
    def _seen(run: Any, run_dir: Path) -> set[int]:
        """Epochs earlier W&B segments of this run already hold."""
        seen: set[int] = set()
        current = Path(getattr(run, "dir", "") or ".").parent
        for run_file in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
            if run_file.parent != current:
                try:
                    seen |= logged_epochs(run_file)
                except Exception:  # noqa: BLE001 - an unreadable segment holds nothing usable
                    continue
        online_epoch = getattr(run, "summary", {}).get("epoch") if not getattr(run, "offline", True) else None
        if isinstance(online_epoch, (int, float)):
            seen |= set(range(int(online_epoch) + 1))
        return seen
