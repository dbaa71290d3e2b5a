"""Covariates of the autonomous windows beyond plain numeric channels, as pytorch-forecasting users know them.

- **Future-known covariates** (``--data.known_future_channels``, forecasting): numeric columns whose
  future values are known when the forecast is made (a planned speed limit, the time of day, a
  control input): pytorch-forecasting's ``time_varying_known_reals``. The encoder reads their past
  like any channel (z-scored after ``channels``); the decoder (the mixture: its heads) reads their
  values at each of the ``predict`` future steps (``known``, ``(B, predict, K)``, z-scored with the
  same statistics). ``predict --data.predict_path`` then needs the future rows: rows after the last
  observed position of a sequence may leave the ``target_channels`` blank (the future, whose known
  channels are given); windows end their observation at a row with positions, and ``true_<channel>``
  is empty where the future was not given.
- **Categorical channels** (``--data.categorical_channels``): text columns, encoded with a
  vocabulary fitted on the training split and embedded in the network (:mod:`domains.autonomous.categorical`).
- **Per-group normalisation** (``--data.normalize_by group --data.group_column C``):
  :mod:`domains.autonomous.group_scaling`.

:func:`check_covariate_options` refuses bad option values before anything is read or written;
:func:`fit_covariate_state` fits the vocabularies and group statistics on the training split (saved
in the checkpoint); :func:`covariate_tensors` adds ``codes``, ``group`` and ``known`` to a split's
window tensors, logging unknown categories and groups (the one rule: warned and counted, never refused).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from pipelines.errors import InputError
from domains.autonomous.categorical import describe_unknown, encode, fit_vocabulary
from domains.autonomous.group_scaling import fit_group_statistics, group_indices, window_group_names
from domains.autonomous.readers import ColumnSpec, Tracks, log, time_seconds
from domains.autonomous.windows import Windows, cut_windows

NORMALIZE_BY = ("global", "group")


def check_covariate_options(hp: Any) -> None:
    """Refuse covariate options that cannot work, naming the option (the data module's hyper-parameters ``hp``)."""
    known, categorical = list(hp.known_future_channels or []), list(hp.categorical_channels or [])
    if hp.normalize_by not in NORMALIZE_BY:
        raise InputError(f"--data.normalize_by must be one of {', '.join(NORMALIZE_BY)}, got {hp.normalize_by!r}")
    if hp.normalize_by == "group" and not hp.group_column:
        raise InputError("--data.normalize_by group needs --data.group_column (the column whose values get their own statistics, e.g. a vehicle id)")
    if hp.group_column and hp.normalize_by != "group":
        raise InputError(f"--data.group_column {hp.group_column!r} is used by per-group normalisation: add --data.normalize_by group, or drop --data.group_column")
    if known and hp.task != "forecasting":
        raise InputError(f"--data.known_future_channels {known}: future-known covariates feed the forecast horizon; --data.task {hp.task} has none. "
                         "Expected --data.task forecasting, or no --data.known_future_channels")  # fmt: skip
    roles = [("--data.channels", hp.channels or []), ("--data.target_channels", hp.target_channels or []),
             ("--data.known_future_channels", known), ("--data.categorical_channels", categorical)]  # fmt: skip
    seen: dict[str, str] = {}
    for option, names in roles:
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise InputError(f"{option}: expected column names; got {name!r}")
            if name in seen:
                raise InputError(f"column {name!r} is listed in both {seen[name]} and {option}; give each column one role "
                                 "(a future-known channel's past is already fed to the encoder)")  # fmt: skip
            seen[name] = option
    for option, name in (("--data.group_column", hp.group_column), *(("--data.categorical_channels", c) for c in categorical)):
        if name in (hp.sequence_column, hp.time_column) or (name and name == hp.target_column):
            raise InputError(f"{option} {name!r} is the sequence, time or target column; expected another column of the table")


def column_roles(hp: Any) -> tuple[list[str], tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The numeric channels read (``channels`` then ``known_future_channels``), the text columns
    (categorical channels, then the group column) and the option naming each in errors."""
    known, categorical = list(hp.known_future_channels or []), list(hp.categorical_channels or [])
    text = (*categorical, *([hp.group_column] if hp.group_column else []))
    roles = tuple((c, "data.known_future_channels") for c in known) + ((hp.group_column, "data.group_column"),) * bool(hp.group_column)
    return [*(hp.channels or []), *known], text, roles


def fit_vocabularies(tracks: Tracks, hp: Any) -> dict[str, list[str]]:
    """The vocabulary of each categorical channel: its values in the training split's rows."""
    return {c: fit_vocabulary(tracks.categories[:, i]) for i, c in enumerate(hp.categorical_channels or [])}


def check_checkpoint_covariates(state: dict[str, Any], hp: Any) -> None:
    """Refuse a checkpoint whose covariate options differ from the data's (its network reads other inputs)."""
    for key, option, mine in (("known_future_channels", "--data.known_future_channels", list(hp.known_future_channels or [])),
                              ("categorical_channels", "--data.categorical_channels", list(hp.categorical_channels or [])),
                              ("groups", "--data.group_column", hp.group_column if hp.normalize_by == "group" else None)):  # fmt: skip
        saved = state.get(key) or ([] if key != "groups" else None)
        saved = saved["column"] if key == "groups" and saved else saved
        if saved != mine:
            raise InputError(f"the checkpoint was trained with {option} {saved!r} but this command gives {mine!r}; give the checkpoint's options")


def fit_covariate_state(tracks: Tracks, windows: Windows, observe: int, hp: Any, regression: bool) -> dict[str, Any]:
    """Vocabularies of the categorical channels and per-group statistics, fitted on the training split."""
    categorical = list(hp.categorical_channels or [])
    state: dict[str, Any] = {
        "known_future_channels": list(hp.known_future_channels or []),
        "categorical_channels": categorical,
        "vocabularies": fit_vocabularies(tracks, hp),
        "groups": None,
    }
    if hp.normalize_by == "group":
        groups = window_group_names(tracks.categories, windows.rows, observe, len(categorical))
        state["groups"], small = fit_group_statistics(tracks.targets, tracks.channels, tracks.label if regression else None, windows.rows, groups, observe, hp.group_column)
        log(f"per-group normalisation by {hp.group_column!r}: {len(state['groups']['names'])} group(s) from the training split"
            + (f"; {len(small)} with fewer than 2 training windows keep the global statistics: {small[:5]}" if small else ""))  # fmt: skip
    return state


def covariate_tensors(tracks: Tracks, windows: Windows, observe: int, stats: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """``codes`` ``(W, observe, n)`` (0: unknown), ``group`` ``(W,)`` (the statistics' row; the last: global) and
    ``known`` ``(W, predict, K)`` (raw future values) of a split's windows; unknown categories and groups are logged."""
    out: dict[str, torch.Tensor] = {}
    rows = windows.rows
    categorical = list(stats.get("categorical_channels") or [])
    if categorical:
        codes = []
        for i, column in enumerate(categorical):
            vocabulary = stats["vocabularies"][column]
            row_codes, unknown = encode(tracks.categories[:, i], vocabulary)
            if unknown:
                log(f"warning: {name}: {sum(unknown.values())} row(s) with a category not seen in training, read as the unknown category: "
                    f"{describe_unknown(column, unknown, vocabulary)}")  # fmt: skip
            codes.append(row_codes[rows[:, :observe]])
        out["codes"] = torch.from_numpy(np.stack(codes, -1))
    if stats.get("groups"):
        group_state = stats["groups"]
        index, unknown = group_indices(window_group_names(tracks.categories, rows, observe, len(categorical)), group_state)
        if unknown:
            listed = ", ".join(f"{g!r} ({n} window{'s' if n != 1 else ''})" for g, n in unknown.most_common(5))
            log(f"warning: {name}: group(s) of {group_state['column']!r} not seen in training use the global statistics: {listed}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))  # fmt: skip
        out["group"] = torch.from_numpy(index)
    known = len(stats.get("known_future_channels") or [])
    if known and rows.shape[1] > observe:
        out["known"] = torch.from_numpy(tracks.channels[rows[:, observe:]][..., -known:])
    return out


def future_rows(table: pd.DataFrame, spec: ColumnSpec, positions: list[str]) -> tuple[pd.DataFrame, dict[str, float]]:
    """A predict file's future rows: per sequence, the rows after its last row with every position given.

    Their positions are filled with that last position (placeholders, never read by the model: windows
    end their observation before them); returns the table and each sequence's last observed time.
    """
    table = table.copy()
    missing = [c for c in positions if c not in table.columns]
    if missing:
        return table, {}  # build_tracks names the missing column
    time = pd.Series(time_seconds(table, spec.time), index=table.index)
    sequence = table[spec.sequence].astype(str)
    given = table[positions].notna().all(1)
    last = time[given].groupby(sequence[given]).max()
    future = time > sequence.map(last).fillna(-np.inf)
    filled = table[positions].where(given).groupby(sequence).ffill()
    table.loc[future, positions] = filled.loc[future]
    return table, {str(k): float(v) for k, v in last.items()}


def known_future_windows(tracks: Tracks, observe: int, predict: int, stride: int, last_observed: dict[str, float], file: str) -> tuple[Windows, np.ndarray]:
    """Windows of ``observe + predict`` rows of a predict file whose observation ends at a row with positions,
    and which of their future rows are placeholders (``(W, predict)``)."""
    windows = cut_windows(tracks, observe + predict, stride)
    placeholder = np.zeros(len(tracks.time), bool)
    for s, (start, length) in enumerate(zip(tracks.starts, tracks.lengths)):
        name = tracks.names[s] if tracks.names[s] in last_observed else tracks.names[s].rsplit("/", 1)[0]
        placeholder[start : start + length] = tracks.time[start : start + length] > last_observed.get(name, np.inf)
    keep = ~placeholder[windows.rows[:, observe - 1]]
    windows = Windows(windows.rows[keep], windows.segment[keep], windows.short_segments, windows.short_rows)
    latest = {tracks.names[s].rsplit("/", 1)[0] if tracks.names[s] not in last_observed else tracks.names[s]: t
              for s, t in zip(windows.segment, tracks.time[windows.rows[:, observe - 1]])}  # fmt: skip
    behind = sorted(name for name, last in last_observed.items() if latest.get(name, -np.inf) < last)
    if behind:
        log(f"warning: predict: {len(behind)} sequence(s) get no forecast from their last observation (fewer than {predict} future rows with "
            f"the known channels after it, or fewer than {observe} observed rows before it): {behind[:5]}")  # fmt: skip
    if len(windows.rows) == 0:
        raise InputError(
            f"{file} (--data.predict_path): no window of observe + predict = {observe + predict} rows with positions in its first "
            f"{observe}: with --data.known_future_channels each forecast needs its {predict} future rows (the known channels given, "
            "the positions may be blank) after at least observe rows with positions"
        )
    return windows, placeholder[windows.rows[:, observe:]]
