"""Read an offline W&B run file (``run-<id>.wandb``) back: the history rows and summary it holds.

The file is W&B's 7-byte header followed by LevelDB-log records (32 KiB blocks, 7-byte record
headers) of ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path, settle: float = 30.0, finished: bool = True) -> list[wandb_internal_pb2.Record]:
    """The file's records. W&B's service process writes the file, and may still be writing it when
    ``wandb.finish()`` has returned in this process: on a loaded machine a finished run was read back
    with 25 of its 42 records (no histograms, no exit record), complete 8 s later, while no process held
    the file open at either moment (its writer opens it per flush). So the file of a run that finished
    (``finished``) is read again until its ``exit`` record is there, for up to ``settle`` seconds; a killed
    run's (``finished=False``), which never gets one, is read once. A child process that has exited left
    its file complete (wandb's exit hook tears its service down)."""
    deadline = time.monotonic() + settle
    while True:
        out = _read(path)
        done = any(record.WhichOneof("record_type") == "exit" for record in out)
        if done or not finished or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _read(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, position = [], b"", HEADER
    while position + HEADER <= len(data):
        room = BLOCK - position % BLOCK
        if room < HEADER:
            position += room
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        chunk = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind == 0 and length == 0:
            position += BLOCK - position % BLOCK if position % BLOCK else 0
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            out.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return out


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def history(path: Path, finished: bool = True) -> list[dict]:
    rows = []
    for record in records(path, finished=finished):
        if record.WhichOneof("record_type") == "history":
            rows.append({_key(item): json.loads(item.value_json) for item in record.history.item})
    return rows


def run_file(run_dir: Path) -> Path:
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}/wandb"
    return files[-1]


def run_record(path: Path):
    """The run record (id, group, job type, tags, config) of an offline run file."""
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")


def run_config(path: Path) -> dict:
    return {item.key: json.loads(item.value_json) for item in run_record(path).config.update if not item.key.startswith("_")}
