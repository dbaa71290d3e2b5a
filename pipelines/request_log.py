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

A ``PATH`` ending in ``.parquet`` is written as Parquet segment files beside it (:class:`ParquetSegments`),
each complete or absent, read back together by :func:`read_log` (and ``python -m pipelines.monitor``).

Sequence inputs a reference names per channel (``sequence_inputs``: autonomous) are logged as each
channel's mean over the window (``past.x``, ...); an image output (``(C, H, W)`` floats, media) as its
summary (``images.mean``, ``images.std``, ``images.pool[k]``: :func:`pipelines.reference.image_summary`).
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

from pipelines.reference import image_summary

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
    sequences = (reference or {}).get("sequence_inputs") or {}
    for name, array in arrays.items():
        item = np.asarray(array[index])
        if name in sequences and item.ndim == 2 and item.shape[-1] == len(sequences[name]):  # per channel, as fit_sequence_reference
            features.update({f"{name}.{channel}": _number(item[:, j].mean()) for j, channel in enumerate(sequences[name])})
        elif reference and reference.get("input") == name and item.ndim == 1 and len(item) == len(reference.get("columns", [])):
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
        elif item.ndim == 3 and item.dtype.kind == "f":  # an image (C, H, W) in [0, 1]: its summary, never its pixels
            found.update({key: _number(values[0]) for key, values in image_summary(item[None], name).items()})
        elif item.dtype.kind in "biuf":
            found[f"{name}.mean"] = _number(item.mean())
    return found


class RequestLog:
    """Appends item records to ``path`` with size rotation; ``sample`` is the share of requests logged."""

    def __init__(self, path: str | Path, max_bytes: int = 64 << 20, keep: int = 5, sample: float = 1.0) -> None:
        self.path, self.max_bytes, self.keep, self.sample = Path(path), max_bytes, keep, sample
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.segments = ParquetSegments(self.path, max_bytes * (keep + 1)) if self.path.suffix == ".parquet" else None

    def wanted(self) -> bool:
        """Whether to log the next request (a ``sample`` share of them, at random)."""
        return self.sample >= 1.0 or random.random() < self.sample

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        if self.segments is not None:
            self.segments.append(records)
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


def flat_row(record: dict[str, Any]) -> dict[str, Any]:
    """A record as a row: ``time``, ``version``, ``form``, its features and ``output.<name>`` (scalars; vectors are left out)."""
    return {"time": record["time"], "version": record.get("version"), "form": record.get("form"), **record["features"],
            **{f"output.{k}": v for k, v in record.get("outputs", {}).items() if not isinstance(v, list)}}  # fmt: skip


class ParquetSegments:
    """A Parquet request log: ``PATH`` (``x.parquet``) is written as segment files ``x-<UTC time>-<pid>-<n>.parquet`` beside it.

    Rows are buffered and a segment is written (to a hidden temporary name, then renamed: complete or
    absent) once ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS`` have gathered, and at the process's exit; the
    oldest segments go when all of them pass ``max_bytes``. A process killed hard loses its buffer (at
    most ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS`` of traffic), never a written segment.
    """

    FLUSH_ROWS, FLUSH_SECONDS = 256, 5.0

    def __init__(self, path: Path, max_bytes: int) -> None:
        import atexit

        self.path, self.max_bytes, self.rows, self.since, self.count = path, max_bytes, [], 0.0, 0
        atexit.register(self.flush)

    def append(self, records: list[dict[str, Any]]) -> None:
        if not self.rows:
            self.since = time.monotonic()
        self.rows += [flat_row(r) for r in records]
        if len(self.rows) >= self.FLUSH_ROWS or time.monotonic() - self.since >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        rows, self.rows = self.rows, []
        self.count += 1
        final = self.path.with_name(f"{self.path.stem}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{self.count:06d}.parquet")
        temporary = final.with_name(f".{final.name}.tmp")
        try:
            pd.DataFrame(rows).to_parquet(temporary, index=False)
            os.chmod(temporary, 0o644)
            os.replace(temporary, final)
        finally:
            temporary.unlink(missing_ok=True)
        files = segment_files(self.path)
        while len(files) > 1 and sum(f.stat().st_size for f in files) > self.max_bytes:
            files.pop(0).unlink(missing_ok=True)


def segment_files(path: str | Path) -> list[Path]:
    """The segments of a Parquet request log ``PATH``, oldest first."""
    path = Path(path)
    return sorted(p for p in path.parent.glob(f"{path.stem}-*.parquet") if not p.name.startswith("."))


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
    if str(path).endswith(".parquet"):
        segments = segment_files(path)
        if not segments:
            raise ValueError(f"{path}: no such request log (no segment {Path(path).stem}-*.parquet beside it)")
        return pd.concat([pd.read_parquet(f) for f in segments], ignore_index=True), 0
    files = log_files(path)
    if not files:
        raise ValueError(f"{path}: no such request log")
    rows, skipped = [], 0
    for file in files:
        for line in file.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rows.append(flat_row(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError):
                skipped += 1
    if not rows and not skipped:
        raise EmptyRequestLog(f"{path}: no request records yet (the log is empty)")
    if not rows:
        raise ValueError(f"{path}: no complete request records ({skipped} unreadable line(s))")
    return pd.DataFrame(rows), skipped


class EmptyRequestLog(ValueError):
    """A request log that exists and holds no record at all (no traffic yet, or just rotated): not a damaged one."""


def window_versions(window: pd.DataFrame) -> list[str]:
    """The model versions that answered a window's records, sorted (empty: a table without a ``version`` column)."""
    return sorted(set(window["version"].astype(str))) if "version" in window.columns else []


def version_problem(window: pd.DataFrame, served: str | None, chosen: str | None) -> tuple[str, list[str]] | None:
    """Why a request-log window is not one model's records, for the caller to word: ``("several", versions)``
    when it holds several versions and none was chosen (``--model_version``); ``("other", versions)`` when it
    holds one version that is not ``served`` (the model it is compared with, where known); else ``None``."""
    versions = window_versions(window)
    if chosen is not None or not versions:
        return None
    if len(versions) > 1:
        return "several", versions
    if served is not None and versions != [served]:
        return "other", versions
    return None
