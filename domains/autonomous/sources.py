"""The autonomous data's source as one long table per split, then validated tracks per split.

A source is a long CSV/TSV/Parquet table, the ETH/UCY benchmark (its own leave-one-scene-out split)
or the embedded vehicle simulator. :func:`source_tables` reads it and cuts it into ``train``,
``val`` and ``test`` tables (a stable :class:`pipelines.splits.SplitRule`, or a seeded split of whole
sequences); :func:`split_tracks` validates each split with
:func:`domains.autonomous.readers.build_tracks` against one time step for the whole data set
(declared, or the training tracks' median step) and logs the NaN and gap counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.errors import InputError
from pipelines.splits import SplitRule, assign, check_filled
from pipelines.time_zones import refuse_mixed_zones
from domains.autonomous.readers import (
    FILE, SPLITS, ColumnSpec, Tracks, build_tracks, check_columns, check_present, log, read_eth_ucy, read_table, where, with_origin,
)  # fmt: skip
from domains.autonomous.simulator import simulate_vehicles

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str) -> Path:
    """``path`` as given when it exists, else relative to the project root (so that the shipped
    ``../shared/data/...`` defaults work from any working directory)."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute() or not (PROJECT_ROOT / given).exists():
        return given
    return PROJECT_ROOT / given


def source_tables(hp: dict, columns: ColumnSpec, rule: SplitRule) -> dict[str, pd.DataFrame]:
    """The source the data options ``hp`` name, as one long table per split (validated later, by :func:`split_tracks`)."""
    if hp["eth_ucy_root"]:
        if hp["sequence_column"] != "sequence" or hp["time_column"] != "time":
            raise InputError("ETH/UCY tables have the columns sequence, time, x, y: leave --data.sequence_column/--data.time_column at their defaults")
        return read_eth_ucy(resolve_path(hp["eth_ucy_root"]), hp["eth_ucy_scene"])
    if hp["path"]:
        table = read_table(resolve_path(hp["path"]))
    else:
        simulated = simulate_vehicles(hp["sim_vehicles"], hp["sim_steps"], hp["sim_dt"], hp["sim_seed"], hp["sim_dropout"])
        table = with_origin(simulated, "<simulator>", 0)
    check_columns(table, columns)  # missing columns are named before anything else
    check_present(table, columns)  # a row without a sequence id or time cannot be split
    # the whole file (each split's table may hold one kind only)
    refuse_mixed_zones(table[columns.time], f"column {columns.time!r} (--data.time_column)", lambda i: where(table, i))
    if rule.stable:
        split = assign(rule, table, str(table[FILE].iloc[0]))
        check_filled(split, rule, str(table[FILE].iloc[0]))
    else:
        sequences = table[hp["sequence_column"]].astype(str)
        split = sequences.map(sequence_split(sequences.tolist(), hp["val_fraction"], hp["test_fraction"], hp["split_seed"])).to_numpy()
    return {name: table[split == name].reset_index(drop=True) for name in SPLITS}


def split_tracks(tables: dict[str, pd.DataFrame], columns: ColumnSpec, hp: dict, step: float | None) -> dict[str, Tracks]:
    """Validated, NaN-handled, gap-split segments of each split, train first; ``step``: the time step
    (None: inferred from the training tracks, then used for every split). The NaN and gap counts are logged."""
    out = {}
    for name, table in tables.items():  # train first
        if len(table) == 0:
            raise InputError(f"split {name!r} is empty: no rows assigned to it (check --data.split_column or the fractions)")
        refuse_empty_columns(table, columns, name, hp["nan_policy"])
        tracks = build_tracks(table, columns, hp["nan_policy"], step, hp["max_gap"], name, time_jitter=hp["time_jitter"])
        step = tracks.report["time_step"]
        report = tracks.report
        log(
            f"{name}: {report['rows']} rows, {report['sequences']} sequences, {report['nan_rows']} rows with NaN "
            f"({report['filled_rows']} filled by {hp['nan_policy']!r}, {report['dropped_rows']} dropped), "
            f"{report['gaps']} time gaps (> {hp['max_gap']:g} x step {report['time_step']:g}) -> {report['segments']} segments"
            + (f"; {report['missing_targets']} rows without a target (kept as inputs, never filled)" if report.get("missing_targets") else "")
        )
        out[name] = tracks
    return out


def refuse_empty_columns(table: pd.DataFrame, columns: ColumnSpec, split: str, nan_policy: str) -> None:
    """Refuse a split in which a channel or position column has no value at all: the NaN rule has nothing to fill
    from and drops every row, which would otherwise surface as "no track is long enough" (the wrong cause)."""
    named = dict(columns.roles)
    roles = [(c, named.get(c, "data.channels")) for c in columns.channels] + [(c, "data.target_channels") for c in columns.targets]
    for column, option in roles:
        if column in table.columns and len(table) and table[column].isna().all():
            files = sorted({str(f) for f in table[FILE].unique()})
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
            raise InputError(
                f"{shown}: column {column!r} (--{option}) has no value in any of the {len(table)} rows of split {split!r}: "
                f"nan_policy {nan_policy!r} has nothing to fill it from, so every row would be dropped; fill the column, "
                f"or leave it out of --{option}"
            )


def sequence_split(names: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Assign each sequence id to train/val/test at random (whole sequences: no leakage between splits)."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InputError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) and sum below 1")
    unique = sorted(set(names))
    rng = np.random.default_rng(seed)
    permuted = [unique[i] for i in rng.permutation(len(unique))]
    n_val, n_test = max(1, round(len(unique) * val_fraction)), max(1, round(len(unique) * test_fraction))
    if n_val + n_test >= len(unique):
        raise InputError(f"{len(unique)} sequence(s) cannot fill train, val and test splits; give more sequences or a split column")
    out = {name: "train" for name in permuted[n_val + n_test :]}
    out.update({name: "val" for name in permuted[:n_val]})
    out.update({name: "test" for name in permuted[n_val : n_val + n_test]})
    return out
