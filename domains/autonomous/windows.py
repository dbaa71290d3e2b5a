"""Sliding windows over the gap-free segments of each split, and the dataset that serves them.

A segment shorter than one window gives no window: it is counted in the log (how many of the
split's segments, how many rows). A data set where no track is long enough is refused with that
cause (the window length, the options that set it, how many tracks, the longest one); so is a split
left with no window while others have some.

Example:
    >>> from domains.autonomous.readers import Tracks
    >>> tracks = Tracks(["a", "b"], np.array([0, 5]), np.array([5, 2]), *(np.zeros((7, 1)),) * 3, None)
    >>> windows = cut_windows(tracks, length=3, stride=1)
    >>> windows.rows.tolist(), windows.short_segments
    ([[0, 1, 2], [1, 2, 3], [2, 3, 4]], 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pipelines.errors import InputError
from domains.autonomous.readers import FILE, Tracks, log


@dataclass
class Windows:
    """Row indices of every window: ``rows[i]`` are the ``observe + predict`` rows of window ``i``."""

    rows: np.ndarray
    segment: np.ndarray
    short_segments: int
    short_rows: int
    missing_targets: int = 0  # windows dropped: their target (at the last observed row) is missing

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class WindowStarts:
    """The windows of a split as their first rows only (``start[i]`` .. ``start[i] + length - 1``): 16 bytes a window,
    for splits whose rows are memory-mapped (:mod:`domains.autonomous.streaming`)."""

    start: np.ndarray
    segment: np.ndarray
    short_segments: int
    short_rows: int
    length: int
    missing_targets: int = 0  # windows dropped: their target (at the last observed row) is missing

    def __len__(self) -> int:
        return len(self.start)

    def block(self, first: int, last: int) -> Windows:
        """Windows ``first .. last - 1`` with their rows."""
        return Windows(self.start[first:last, None] + np.arange(self.length)[None], self.segment[first:last], 0, 0)


def window_starts(tracks: Tracks, length: int, stride: int, target_row: int | None = None) -> WindowStarts:
    """Every ``length``-row window with start offsets ``0, stride, 2*stride, ...`` in each segment.

    Segments shorter than ``length`` give no window; they are counted (``short_segments``), not an error.
    With ``target_row`` (the last observed row's offset, ``observe - 1``) and a target column, a window whose
    target is missing there is dropped and counted (``missing_targets``): a label is never made up.
    """
    if length < 1 or stride < 1:
        raise InputError(f"window length and stride must be >= 1, got {length} and {stride}")
    starts, segments = [], []
    usable = tracks.lengths >= length
    for index in np.flatnonzero(usable):
        offsets = np.arange(0, tracks.lengths[index] - length + 1, stride)
        starts.append(tracks.starts[index] + offsets)
        segments.append(np.full(len(offsets), index))
    start = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, dtype=np.int64)
    segment = np.concatenate(segments).astype(np.int64) if segments else np.zeros(0, dtype=np.int64)
    missing = 0
    if target_row is not None and tracks.label is not None and len(start):
        labelled = ~pd.isna(tracks.label[start + target_row])
        missing = int((~labelled).sum())
        start, segment = start[labelled], segment[labelled]
    return WindowStarts(start, segment, int((~usable).sum()), int(tracks.lengths[~usable].sum()), length, missing)


def cut_windows(tracks: Tracks, length: int, stride: int, target_row: int | None = None) -> Windows:
    """:func:`window_starts` with every window's rows."""
    starts = window_starts(tracks, length, stride, target_row)
    return Windows(starts.start[:, None] + np.arange(length)[None], starts.segment, starts.short_segments, starts.short_rows, starts.missing_targets)


def _files(names: list[str]) -> str:
    names = sorted(set(names))
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more files" if len(names) > 3 else "")


def cut_split_windows(
    tracks: dict[str, Tracks], tables: dict[str, pd.DataFrame], observe: int, predict: int, stride: int, max_gap: float
) -> dict[str, Windows]:
    """The windows of every split (``observe + predict`` rows), short segments counted in the log."""
    cut = {name: cut_windows(split, observe + predict, stride, observe - 1) for name, split in tracks.items()}
    files = {name: [str(f) for f in table[FILE].unique()] for name, table in tables.items()}
    check_split_windows(cut, tracks, files, observe, predict, max_gap)
    return cut


def check_split_windows(cut: dict[str, Any], tracks: dict[str, Tracks], files: dict[str, list[str]], observe: int, predict: int, max_gap: float) -> None:
    """Refuse a data set with no window, or a split without one (``cut``: each split's :class:`Windows` or
    :class:`WindowStarts`; ``files``: each split's source files, named in the message); log the short segments."""
    length = observe + predict
    # (predict is 0 for regression and classification: their window is the observed rows only)
    need = f"observe + predict = {length} rows (--data.observe {observe} + --data.predict {predict})" if predict else f"observe = {length} rows (--data.observe {observe})"
    for name, windows in cut.items():
        if windows.missing_targets:
            log(f"{name}: {windows.missing_targets} window(s) whose target is missing at their last observed row: dropped "
                f"(nan_policy fills input channels only, never a target)")  # fmt: skip
    if not any(len(windows) for windows in cut.values()) and any(w.missing_targets for w in cut.values()):
        raise InputError(f"{_files([f for names in files.values() for f in names])}: every window's target is missing at its last observed row "
                         f"({sum(w.missing_targets for w in cut.values())} windows); the target column must hold values")  # fmt: skip
    if not any(len(windows) for windows in cut.values()):
        segments = sum(len(t.lengths) for t in tracks.values())
        count = sum(t.report["sequences"] for t in tracks.values())
        longest = max((int(t.lengths.max()) for t in tracks.values() if len(t.lengths)), default=0)
        raise InputError(
            f"{_files([f for names in files.values() for f in names])}: no track is long enough for one window of {need}: all {count} tracks ({segments} gap-free "
            f"segments) are shorter, the longest segment has {longest} rows; lower --data.observe/--data.predict, or check the time "
            f"gaps (a step of more than --data.max_gap = {max_gap:g} time steps splits a track)"
        )
    for name, windows in cut.items():
        split = tracks[name]
        if windows.short_segments:
            log(f"{name}: {windows.short_segments} of {len(split.lengths)} segment(s) ({windows.short_rows} rows) shorter than {need}: skipped")
        if len(windows) == 0:
            raise InputError(
                f"{_files(files[name])}: split {name!r} has no window of {need}: all its {len(split.lengths)} segments are too short "
                f"(longest {int(split.lengths.max()) if len(split.lengths) else 0} rows) while other splits have long enough tracks; "
                f"give it longer tracks (--data.split_column, --data.split_seed) or lower --data.observe/--data.predict"
            )


def window_tensors(
    tracks: Tracks, windows: Windows, observe: int, task: str, class_names: list[str], target_column: str | None, name: str
) -> dict[str, torch.Tensor]:
    """``past``, ``channels``, ``time`` (of the last observed row), ``future`` (forecasting) and the
    ``target`` (regression) or ``label`` index (classification) at each window's last observed row.

    Positions are centred on each window's last observed position in float64 (``origin``, float64,
    kept beside them) and only then cast to float32: in float32 a UTM easting of 500 000 m has a
    resolution of 3 cm and a northing of 5e6 m one of 50 cm, more than a pedestrian moves in a step.
    The model reads displacements, which centring leaves unchanged; ``predict`` adds ``origin`` back
    in float64.
    """
    rows, obs = windows.rows, observe
    origin = tracks.targets[rows[:, obs - 1]].astype(np.float64)  # (B, D)
    out = {
        "past": torch.from_numpy((tracks.targets[rows[:, :obs]] - origin[:, None]).astype(np.float32)),
        "origin": torch.from_numpy(origin),
        "channels": torch.from_numpy(tracks.channels[rows[:, :obs]]),
        "time": torch.from_numpy(tracks.time[rows[:, obs - 1]]),
    }
    if rows.shape[1] > obs:
        out["future"] = torch.from_numpy((tracks.targets[rows[:, obs:]] - origin[:, None]).astype(np.float32))
    last = tracks.label[rows[:, obs - 1]] if tracks.label is not None else None
    if last is not None and pd.isna(last).any():  # only a predict file's windows (training splits drop them): no truth to show
        log(f"{name}: {int(pd.isna(last).sum())} window(s) without a target at their last observed row: the target column is not compared")
        last = None
    if last is not None:
        if task == "regression":
            out["target"] = torch.from_numpy(last.astype(np.float32))
        else:
            index = {c: i for i, c in enumerate(class_names)}
            unknown = sorted({str(v) for v in last} - set(index))
            if unknown:
                raise InputError(f"split {name!r}: target column {target_column!r} has class(es) {unknown[:5]} not in the classes {class_names} "
                                 f"(--data.class_names, or else the training split's); give every class with --data.class_names, "
                                 f"or split so that the training split has them")  # fmt: skip
            out["label"] = torch.tensor([index[str(v)] for v in last], dtype=torch.long)
    return out


class WindowDataset(Dataset):
    """Items ``{"past": (observe, D), "origin": (D,), "channels": (observe, C), ["future": (predict, D)], ["label"], "time", "index"}``."""

    def __init__(self, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
        self.tensors = tensors
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return {key: value[item] for key, value in self.tensors.items()} | {"index": item}
