"""Per-group normalisation (``--data.normalize_by group --data.group_column C``), pytorch-forecasting's ``GroupNormalizer`` for sensor windows.

With one fleet of vehicles, or several operating conditions, one global z-score mixes scales: a
truck's speed of 20 m/s is fast, a car's is not. ``normalize_by group`` fits, on the training split
only, per value of ``group_column`` (e.g. ``vehicle``, ``condition``):

- the per-channel mean and standard deviation (the ``channels`` and the ``known_future_channels``),
- the displacement scale (the RMS step length of the group's training windows),
- for regression, the target's mean and standard deviation,

and keeps the global statistics beside them. A window belongs to the group of its **last observed
row**. All of it is saved in the checkpoint (the data module's state, ``groups``) and in exported
bundles (the ``group`` input indexes the tables, the server maps names to indices).

**An unseen group** (at val, test, predict or in a served request) is never refused: its windows use
the **global** statistics, and a warning names the group and how many windows (the log; a served
answer's ``unknown_group``). A group needs ``MIN_GROUP_WINDOWS`` training windows to get its own
statistics; a smaller one is kept on the global statistics too (named in the log at fit time).

Example:
    >>> tables = scaling_tables({"channel_mean": [0.0], "channel_std": [1.0], "displacement_scale": 2.0, "target_mean": 0.0, "target_std": 1.0,
    ...                          "groups": {"names": ["a"], "channel_mean": [[5.0]], "channel_std": [[2.0]], "displacement_scale": [4.0],
    ...                                     "target_mean": [0.0], "target_std": [1.0]}})
    >>> window_scaling(tables, torch.tensor([0, 1]))["displacement_scale"].tolist()  # group 'a', then the global row
    [4.0, 2.0]
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

#: fewer training windows than this: the group keeps the global statistics (its own would be noise)
MIN_GROUP_WINDOWS = 2
SCALED = ("channel_mean", "channel_std", "displacement_scale", "target_mean", "target_std")


def window_group_names(categories: np.ndarray, rows: np.ndarray, observe: int, column: int) -> np.ndarray:
    """The group of each window: the group column's value at its last observed row (``(W,)`` text)."""
    return categories[rows[:, observe - 1], column].astype(str)


def fit_group_statistics(
    targets: np.ndarray, channels: np.ndarray, label: np.ndarray | None, rows: np.ndarray, groups: np.ndarray, observe: int, column: str
) -> tuple[dict[str, Any], list[str]]:
    """Per-group statistics of the training windows (``rows`` ``(W, L)``, ``groups`` ``(W,)``) and the groups too small to get their own."""
    names, small = [], []
    fitted: dict[str, list] = {key: [] for key in SCALED}
    for name in sorted(set(groups.tolist())):
        windows = rows[groups == name]
        if len(windows) < MIN_GROUP_WINDOWS:
            small.append(name)
            continue
        observed = channels[np.unique(windows[:, :observe])]
        steps = np.diff(targets[windows], axis=1).reshape(-1, targets.shape[1]) if targets.shape[1] else np.zeros((0, 0))
        scale = float(np.sqrt((steps**2).sum(1).mean())) if steps.size else 1.0
        names.append(name)
        fitted["channel_mean"].append(observed.mean(0).astype(float).tolist())
        fitted["channel_std"].append(np.maximum(observed.std(0), 1e-6).astype(float).tolist())
        fitted["displacement_scale"].append(max(scale, 1e-6))
        values = label[windows[:, observe - 1]].astype(float) if label is not None else np.zeros(1)
        fitted["target_mean"].append(float(values.mean()) if label is not None else 0.0)
        fitted["target_std"].append(float(max(values.std(), 1e-6)) if label is not None else 1.0)
    return {"column": column, "names": names, **fitted, "global_only": small}, small


def group_indices(groups: np.ndarray, state: dict[str, Any]) -> tuple[np.ndarray, Counter]:
    """Each window's row of the statistics tables (``len(names)``: the global row) and the window counts of the groups
    not seen in training (not those seen with too few windows: ``global_only``)."""
    index = {name: i for i, name in enumerate(state["names"])}
    rows = np.array([index.get(g, len(index)) for g in groups.tolist()], dtype=np.int64)
    seen = set(state.get("global_only") or [])
    return rows, Counter(g for g, r in zip(groups.tolist(), rows.tolist()) if r == len(index) and g not in seen)


def scaling_tables(stats: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Float32 tables, one row per group and the global statistics as the last row (the only row without groups)."""
    groups = stats.get("groups") or {key: [] for key in SCALED}
    out = {}
    for key in SCALED:
        rows = [*groups[key], stats[key]]
        out[key] = torch.tensor(rows, dtype=torch.float32)
    return out


def window_scaling(tables: dict[str, torch.Tensor], group: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Each window's statistics: ``channel_mean``/``channel_std`` ``(B or 1, 1, C)``, the others ``(B or 1,)``;
    ``group`` ``(B,)`` indexes the tables (``None``: the global row for every window)."""
    index = group if group is not None else torch.full((1,), len(tables["displacement_scale"]) - 1, dtype=torch.long, device=tables["displacement_scale"].device)
    out = {key: table[index] for key, table in tables.items()}
    out["channel_mean"], out["channel_std"] = out["channel_mean"][:, None], out["channel_std"][:, None]
    return out
