"""The windows of a ``predict --data.predict_path`` file, checked like the training data.

Windows of ``observe`` rows; with future-known covariates (``--data.known_future_channels``) windows
of ``observe + predict`` rows whose future rows give the known channels, the positions of a
sequence's rows after its last observed position being blank (:func:`domains.autonomous.covariates.future_rows`).
The file is checked against the training data's time step (the checkpoint's). With ``--data.streaming true`` it is
read in chunks into a memory-mapped cache and its windows read per item (:func:`streamed_predict_dataset`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipelines.errors import InputError
from domains.autonomous.covariates import future_rows, known_future_windows
from domains.autonomous.position_units import REFERENCE, check_step_scale, locator
from domains.autonomous.readers import FILE, ColumnSpec, Tracks, build_tracks, log, read_table
from domains.autonomous.sources import resolve_path
from domains.autonomous.streaming import MappedWindows, StreamedTable
from domains.autonomous.windows import WindowDataset, Windows, WindowStarts, cut_windows, window_starts


def predict_dataset(
    path: str, columns: ColumnSpec, hp: Any, step: float, predict: int, tensors: Callable[[Tracks, Windows, str], dict[str, torch.Tensor]],
    step_scale: float | None = None,
) -> WindowDataset:
    """``tensors(tracks, windows, split name)`` builds a window's tensors (the data module's); ``predict``: future
    rows per window when the model reads future-known covariates (else 0); ``step_scale``: the checkpoint's
    (a track in another length unit is refused: :mod:`domains.autonomous.position_units`)."""
    table = read_table(resolve_path(path))
    observe, file = hp.observe, str(table[FILE].iat[0])
    last_observed: dict[str, float] = {}
    if predict:
        table, last_observed = future_rows(table, columns, list(columns.targets))
    tracks = build_tracks(table, columns, hp.nan_policy, step, hp.max_gap, "predict", require_label=False, time_jitter=hp.time_jitter)
    check_step_scale(tracks, step_scale, "predict", locator({"predict": table}, columns.sequence, file), REFERENCE, list(columns.targets))
    if predict:
        windows, placeholder = known_future_windows(tracks, observe, predict, hp.stride, last_observed, file)
    else:
        windows, placeholder = cut_windows(tracks, observe, hp.stride), None
    check_predict_windows(windows, tracks, observe, predict, file)
    out = tensors(tracks, windows, "predict")
    if placeholder is not None and "future" in out:  # the future given as blanks is not a truth: empty true_ columns
        out["future"][torch.from_numpy(np.asarray(placeholder))] = float("nan")
    return WindowDataset(out, [tracks.names[s] for s in windows.segment])


def check_predict_windows(windows: Windows | WindowStarts, tracks: Tracks, observe: int, predict: int, file: str) -> None:
    """Log the segments too short for a window; refuse a file with no window."""
    if windows.short_segments:
        log(f"predict: {windows.short_segments} of {len(tracks.lengths)} segment(s) shorter than {observe + predict} rows: skipped")
    if len(windows) == 0:
        raise InputError(
            f"{file} (--data.predict_path): no track has observe = {observe} rows (--data.observe): all {len(tracks.lengths)} "
            f"gap-free segments are shorter (longest {int(tracks.lengths.max()) if len(tracks.lengths) else 0} rows)"
        )


def streamed_predict_dataset(
    path: str, columns: ColumnSpec, hp: Any, step: float, tensors: Callable[[Tracks, Windows, str], dict[str, torch.Tensor]], step_scale: float | None = None
) -> MappedWindows:
    """``--data.streaming true``: the windows of ``observe`` rows of a file read in chunks into a memory-mapped cache
    (:class:`domains.autonomous.streaming.StreamedTable`, one ``predict`` split), read per item."""
    table = StreamedTable(resolve_path(path), columns, hp, None, require_label=False)
    tracks = table.tracks(step)["predict"]
    check_step_scale(tracks, step_scale, "predict", locator(None, columns.sequence, str(table.path)), REFERENCE, list(columns.targets))
    windows = window_starts(tracks, hp.observe, hp.stride)
    check_predict_windows(windows, tracks, hp.observe, 0, str(table.path))
    return MappedWindows(tracks, windows, tensors, "predict", table.maps)
