"""The server's request log (``python -m pipelines.serve ... --request_log PATH``): what the model saw and answered.

One JSON line per answered item (a row, a sequence, an image, a sample)::

    {"time": "2026-11-30T10:00:00.123+00:00", "model": "finance", "version": "v0002", "form": "rows",
     "features": {"x0": 0.12, ...}, "outputs": {"score": 3.1, "is_alert": 0, ...}}

``features``: the columns of the bundle input its reference statistics describe (named as in the
training data: :mod:`pipelines.reference`), other 2-D inputs of at most ``MAX_COLUMNS`` columns as
``input[j]``, larger inputs (images, sequences) summarised as ``input.mean`` and ``input.std``: raw
images are never written. ``outputs``: per item scalars, short vectors as lists, longer ones as their mean.

Lines are complete or absent: each batch is one ``write`` on an ``O_APPEND`` descriptor under an
``fcntl`` lock (several inference workers share the file), and a line left cut by a kill is
isolated by a newline before the next write and skipped by :func:`read_log`. When the file would
pass ``max_bytes`` it is rotated (``PATH`` -> ``PATH.1`` -> ... -> ``PATH.<keep>``, the oldest dropped).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

MAX_COLUMNS = 64
MAX_OUTPUT_VALUES = 16


def _number(value: Any) -> float | int | None:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def item_features(arrays: dict[str, np.ndarray], index: int, reference: dict[str, Any] | None) -> dict[str, Any]:
    """The logged features of item ``index`` of a request's model inputs."""
    features: dict[str, Any] = {}
    for name, array in arrays.items():
        item = np.asarray(array[index])
        if reference and reference.get("input") == name and item.ndim == 1 and len(item) == len(reference.get("columns", [])):
            features.update({column: _number(v) for column, v in zip(reference["columns"], item)})
        elif item.ndim == 0:
            features[name] = _number(item)
        elif item.ndim == 1 and len(item) <= MAX_COLUMNS:
            features.update({f"{name}[{j}]": _number(v) for j, v in enumerate(item)})
        elif item.dtype.kind in "biuf" and item.size:
            features[f"{name}.mean"], features[f"{name}.std"] = _number(item.mean()), _number(item.std())
    return features


def item_outputs(outputs: dict[str, np.ndarray], index: int) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, array in outputs.items():
        item = np.asarray(array[index])
        if item.ndim == 0:
            found[name] = _number(item)
        elif item.size <= MAX_OUTPUT_VALUES:
            found[name] = [_number(v) for v in item.reshape(-1)]
        elif item.dtype.kind in "biuf":
            found[f"{name}.mean"] = _number(item.mean())
    return found


class RequestLog:
    """Appends item records to ``path`` with size rotation; ``sample`` is the share of requests logged."""

    def __init__(self, path: str | Path, max_bytes: int = 64 << 20, keep: int = 5, sample: float = 1.0) -> None:
        self.path, self.max_bytes, self.keep, self.sample = Path(path), max_bytes, keep, sample
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def wanted(self) -> bool:
        """Whether to log the next request (a ``sample`` share of them, at random)."""
        return self.sample >= 1.0 or random.random() < self.sample

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records).encode()
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            size = self.path.stat().st_size if self.path.exists() else 0
            if size and size + len(data) > self.max_bytes:
                self._rotate()
                size = 0
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a line cut by a kill: keep it apart from ours
                    data = b"\n" + data
                os.write(fd, data)
            finally:
                os.close(fd)

    def _rotate(self) -> None:
        for number in range(self.keep, 0, -1):
            source = self.path if number == 1 else self.path.with_name(f"{self.path.name}.{number - 1}")
            if source.exists():
                os.replace(source, self.path.with_name(f"{self.path.name}.{number}"))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}+00:00"


def log_files(path: str | Path) -> list[Path]:
    """``PATH`` and its rotated files, oldest first."""
    path = Path(path)
    rotated = sorted((p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()), key=lambda p: -int(p.suffix[1:]))
    return [*rotated, *([path] if path.exists() else [])]


def read_log(path: str | Path) -> tuple[pd.DataFrame, int]:
    """The log (with its rotated files) as a frame: ``time``, ``version``, ``form``, the features, ``output.<name>``;
    and how many lines were skipped (cut by a kill). ``ValueError`` naming the file when there is nothing to read."""
    files = log_files(path)
    if not files:
        raise ValueError(f"{path}: no such request log")
    rows, skipped = [], 0
    for file in files:
        for line in file.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows.append({"time": record["time"], "version": record.get("version"), "form": record.get("form"), **record["features"],
                             **{f"output.{k}": v for k, v in record.get("outputs", {}).items() if not isinstance(v, list)}})  # fmt: skip
            except (json.JSONDecodeError, KeyError, TypeError):
                skipped += 1
    if not rows:
        raise ValueError(f"{path}: no complete request records ({skipped} unreadable line(s))")
    return pd.DataFrame(rows), skipped
