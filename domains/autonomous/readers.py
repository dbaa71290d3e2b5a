"""Readers and validation for long-format sensor tables, and the sliding windows cut from them.

A long table has one row per (sequence, time): a sequence id column, a time or frame column and
any number of sensor channels. :func:`read_table` reads CSV/TSV or Parquet; :func:`read_eth_ucy`
reads the ETH/UCY pedestrian benchmark in its Social-GAN layout (``<scene>/{train,val,test}/*.txt``,
rows ``frame ped x y``) into the same long form. :func:`build_tracks` checks a table (missing
columns, non-numeric values, duplicate or unsorted times, each named by file, column and row;
timestamps, Parquet datetimes or ISO 8601 text, are read as seconds: :func:`time_seconds`),
applies the NaN rule, and cuts every sequence at its time gaps into gap-free segments (gaps are
never bridged), after the sampling-rate rules of :mod:`domains.autonomous.sampling`.
:func:`check_values` refuses inf and float32 overflow in every used numeric column (NaN is the NaN
rule's job). :func:`domains.autonomous.windows.cut_windows` slides windows over the segments.

Every row keeps its origin in two bookkeeping columns, ``_file`` and ``_line`` (the 1-based data
row of the file: the header is not counted, in every format), so that errors can say where to look.
Every error is an :class:`pipelines.errors.InputError`: the runner prints it and exits 2.

Example:
    >>> table = pd.DataFrame({"sequence": ["a"] * 5, "time": range(5), "x": range(5)})
    >>> tracks = build_tracks(with_origin(table, "demo.csv", 1), ColumnSpec("sequence", "time", ["x"], []))
    >>> tracks.lengths.tolist(), tracks.names
    ([5], ['a'])
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.errors import InputError
from pipelines.csv_text import check_csv_text, check_delimiter
from pipelines.time_zones import refuse_mixed_zones
from pipelines.validation import check_finite_columns, check_unique_columns
from domains.autonomous.categorical import category_text
from domains.autonomous.sampling import check_sampling, gap_mask, infer_time_step

SPLITS = ("train", "val", "test")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
NAN_POLICIES = ("drop", "ffill", "interpolate")
ETH_UCY_SCENES = ("eth", "hotel", "univ", "zara1", "zara2")
FILE, LINE = "_file", "_line"


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns play which role.

    ``targets`` are forecast channels (forecasting) and ``label`` the per-window target column
    (regression: numeric; classification: any values, used as class names).
    """

    sequence: str
    time: str
    channels: list[str]
    targets: list[str]
    label: str | None = None
    label_numeric: bool = True
    #: text columns carried as they are (``Tracks.categories``): the group column and categorical channels
    categorical: tuple[str, ...] = ()
    #: ``(column, option)`` naming the option of a column in errors (default: ``data.channels``)
    roles: tuple[tuple[str, str], ...] = ()


def with_origin(table: pd.DataFrame, file: str, first_row: int = 1) -> pd.DataFrame:
    """Add the bookkeeping columns: row ``i`` of ``table`` is data row ``first_row + i`` of ``file``."""
    table = table.copy()
    table[FILE] = file
    table[LINE] = np.arange(len(table)) + first_row
    return table


def origin(table: pd.DataFrame, position: int) -> tuple[str, int]:
    """``(file, 1-based data row)`` of the row at ``position``."""
    return str(table[FILE].iat[position]), int(table[LINE].iat[position])


def where(table: pd.DataFrame, position: int) -> str:
    """``file row N`` (1-based data row, the header not counted) of the row at ``position``."""
    file, row = origin(table, position)
    return f"{file} row {row}"


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV (``,``), TSV (``\t``) or Parquet long table, with origin columns.

    Refused: a missing file, another extension, an empty file or one with a header and no rows, a
    header naming a column twice, and a file the reader cannot parse.
    """
    path = Path(path)
    sep, header = open_table(path)
    try:
        table = pd.read_parquet(path) if sep is None else pd.read_csv(path, sep=sep)
    except Exception as error:  # pandas/pyarrow raise many types; the message is what matters
        raise InputError(f"{path}: cannot read the table: {error}") from None
    if len(table) == 0:
        raise InputError(f"{path}: the table has no data rows (columns {header}); expected one row per (sequence, time)")
    return with_origin(table, str(path), 1)


def open_table(path: Path) -> tuple[str | None, list[str]]:
    """A long table's separator (``None`` for Parquet) and header, after the checks of :func:`read_table` that need
    no parsing: the file exists, its extension, not empty, UTF-8 CSV text with whole rows, each column named once."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputError(f"{path}: unsupported table format {suffix!r}; expected one of {', '.join(TABLE_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes); expected a header and one row per (sequence, time)")
    sep = None if suffix in (".parquet", ".pq") else ("\t" if suffix == ".tsv" else ",")
    try:
        if sep is None:
            import pyarrow.parquet as pq

            header = [str(c) for c in pq.read_schema(path).names if not str(c).startswith("__index_level_")]
        else:
            check_csv_text(path, sep)  # UTF-8, and a short row (a file cut short) refused, not read with missing channels
            header = [str(c) for c in pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str).iloc[0]]
    except InputError:
        raise
    except Exception as error:  # pandas/pyarrow raise many types; the message is what matters
        raise InputError(f"{path}: cannot read the table: {error}") from None
    if sep is not None:
        check_delimiter(header, str(path), sep)
    check_unique_columns(header, str(path))
    return sep, header


def read_eth_ucy(root: str | Path, scene: str) -> dict[str, pd.DataFrame]:
    """Read one leave-one-scene-out fold: ``{split: long table}`` with columns ``sequence, time, x, y``.

    ``root/scene/train`` holds the other scenes' training files, ``val`` their validation files and
    ``test`` the held-out scene. A pedestrian's id is ``<file stem>:<ped>`` (ids repeat across files).
    """
    folder = Path(root) / scene
    if not folder.is_dir():
        found = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        raise InputError(f"eth_ucy_root {root}: no scene folder {scene!r} (found: {found or 'nothing'}); expected <root>/<scene>/{{train,val,test}}/*.txt")
    tables: dict[str, pd.DataFrame] = {}
    for split in SPLITS:
        files = sorted((folder / split).glob("*.txt"))
        if not files:
            raise InputError(f"{folder / split}: no .txt files (expected tab-separated rows 'frame ped x y')")
        parts = []
        for file in files:
            try:
                raw = pd.read_csv(file, sep=r"\s+", header=None, dtype=str, engine="c")
            except Exception as error:
                raise InputError(f"{file}: cannot read as whitespace-separated 'frame ped x y' rows: {error}") from None
            if raw.shape[1] != 4:
                raise InputError(f"{file}: rows have {raw.shape[1]} fields; expected 4 (frame ped x y)")
            raw.columns = ["time", "ped", "x", "y"]
            ped = pd.to_numeric(raw["ped"], errors="coerce")
            bad = np.flatnonzero(ped.isna().to_numpy())
            if len(bad):
                raise InputError(f"{file} row {bad[0] + 1}, column 'ped': value {raw['ped'].iloc[bad[0]]!r} is not numeric")
            raw["sequence"] = file.stem + ":" + ped.map(lambda p: f"{p:g}")
            parts.append(with_origin(raw[["sequence", "time", "x", "y"]], str(file), 1))
        tables[split] = pd.concat(parts, ignore_index=True)
    return tables


@dataclass
class Tracks:
    """Validated rows of one split, grouped into gap-free segments (rows of a segment are contiguous)."""

    names: list[str]
    starts: np.ndarray
    lengths: np.ndarray
    time: np.ndarray
    targets: np.ndarray
    channels: np.ndarray
    label: np.ndarray | None
    report: dict[str, int] = field(default_factory=dict)
    categories: np.ndarray | None = None  # (rows, len(ColumnSpec.categorical)) text values, as strings


def _numeric(table: pd.DataFrame, column: str) -> np.ndarray:
    values = table[column]
    if pd.api.types.is_bool_dtype(values):
        raise InputError(f"{table[FILE].iloc[0]}: column {column!r} holds booleans; expected numbers")
    numbers = pd.to_numeric(values, errors="coerce")
    bad = np.flatnonzero(numbers.isna().to_numpy() & values.notna().to_numpy())
    if len(bad):
        raise InputError(f"{where(table, bad[0])}, column {column!r}: value {values.iloc[bad[0]]!r} is not numeric ({len(bad)} such row(s))")
    return numbers.to_numpy(dtype=np.float64)


def time_seconds(table: pd.DataFrame, column: str) -> np.ndarray:
    """The time column as float64: numbers as they are (seconds or frames); timestamps in seconds.

    A datetime column (Parquet ``timestamp``, any precision or time zone) and ISO 8601 text (a CSV's
    ``2024-05-01T13:45:00.100``, with or without a zone) become seconds since 1970-01-01 UTC (a
    time without a zone is read as UTC), so that a Parquet file and its CSV export give the same
    times, steps (``--data.time_step`` in seconds) and windows. Text mixing numbers and timestamps,
    or timestamps that are not ISO 8601, is refused naming the first row.
    """
    values = table[column]
    if pd.api.types.is_datetime64_any_dtype(values):
        stamps = values.dt.tz_convert("UTC") if getattr(values.dt, "tz", None) is not None else values
        return _epoch_seconds(pd.Series(stamps))
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return _numeric(table, column)
    present = values.notna().to_numpy()
    numbers = pd.to_numeric(values, errors="coerce")
    text = values.astype(str).str.strip()
    if not (numbers.notna().to_numpy() | ~present).all() and text[present].str.match(r"^\d{4}-\d{2}-\d{2}").any():
        refuse_mixed_zones(values, f"column {column!r} (--data.time_column)", lambda i: where(table, i))
        parsed = pd.to_datetime(values.where(present), format="ISO8601", utc=True, errors="coerce")
        bad = np.flatnonzero(parsed.isna().to_numpy() & present)
        if len(bad):
            raise InputError(
                f"{where(table, bad[0])}, column {column!r}: value {values.iloc[bad[0]]!r} is not an ISO 8601 timestamp ({len(bad)} such row(s)); "
                "expected every time as a number (seconds or frames) or every time as ISO 8601 text (e.g. 2024-05-01T13:45:00.100)"
            )
        return _epoch_seconds(parsed)
    return _numeric(table, column)


def _epoch_seconds(stamps: pd.Series) -> np.ndarray:
    """Seconds since 1970-01-01 (UTC for aware times) as float64; NaT -> NaN."""
    nanoseconds = stamps.dt.tz_localize(None) if getattr(stamps.dt, "tz", None) is not None else stamps
    ns = nanoseconds.astype("datetime64[ns]").to_numpy().astype("int64").astype(np.float64)
    return np.where(stamps.isna().to_numpy(), np.nan, ns / 1e9)


def check_columns(table: pd.DataFrame, spec: ColumnSpec, require_label: bool = True) -> None:
    """Raise ``ValueError`` naming the file and the missing column(s) and their role."""
    file = table[FILE].iloc[0] if len(table) else "the table"
    roles = [(spec.sequence, "data.sequence_column"), (spec.time, "data.time_column")]
    named = dict(spec.roles)
    roles += [(c, named.get(c, "data.channels")) for c in spec.channels] + [(c, "data.target_channels") for c in spec.targets]
    roles += [(c, named.get(c, "data.categorical_channels")) for c in spec.categorical]
    missing = [(c, r) for c, r in roles if c not in table.columns]
    columns = [c for c in table.columns if c not in (FILE, LINE)]
    if missing:
        listed = ", ".join(f"{c!r} ({r})" for c, r in missing)
        raise InputError(f"{file}: column(s) {listed} not found; the file has columns {columns}")
    if spec.label is not None and require_label and spec.label not in table.columns:
        raise InputError(f"{file}: target column {spec.label!r} (data.target_column) is absent; the file has columns {columns}")


def check_values(table: pd.DataFrame, spec: ColumnSpec, require_label: bool = True) -> None:
    """Refuse missing columns, missing sequence ids or times, text in a numeric column, and inf or
    float32 overflow in any used numeric column (time, target channels, channels, a numeric target),
    naming the file, its rows and the column. NaN values of the channels and targets are left to
    the NaN rule. ``table`` may hold any rows of any files (e.g. one split of them)."""
    check_columns(table, spec, require_label)
    check_present(table, spec)
    numeric = [spec.time, *spec.targets, *spec.channels]
    if spec.label is not None and spec.label_numeric and spec.label in table.columns:
        numeric.append(spec.label)
    for file, part in table.groupby(FILE, sort=False):
        values = pd.DataFrame({column: time_seconds(part, column) if column == spec.time else _numeric(part, column) for column in dict.fromkeys(numeric)})
        nan_allowed = [c for c in values.columns if c != spec.time]
        values[nan_allowed] = values[nan_allowed].fillna(0.0)  # NaN rows: handled by data.nan_policy
        # laid out by data row (rows of other splits are 0), so that the message names file rows
        rows = part[LINE].to_numpy(dtype=np.int64)
        first = int(rows.min())
        by_row = np.zeros((int(rows.max()) - first + 1, values.shape[1]))
        by_row[rows - first] = values.to_numpy()
        check_finite_columns(pd.DataFrame(by_row, columns=values.columns), str(file), list(values.columns), first_row=first)


def check_present(table: pd.DataFrame, spec: ColumnSpec) -> None:
    for column in (spec.sequence, spec.time):
        missing = np.flatnonzero(table[column].isna().to_numpy())
        if len(missing):
            raise InputError(f"{where(table, missing[0])}, column {column!r}: value is missing ({len(missing)} such row(s)); every row needs a sequence id and a time")


def _fill(values: np.ndarray, group: np.ndarray, policy: str) -> np.ndarray:
    frame = pd.DataFrame(values)
    if policy == "ffill":
        return frame.groupby(group).ffill().to_numpy()
    return frame.groupby(group).transform(lambda s: s.interpolate(limit_area="inside")).to_numpy()


def build_tracks(
    table: pd.DataFrame,
    spec: ColumnSpec,
    nan_policy: str = "drop",
    time_step: float | None = None,
    max_gap: float = 1.9,
    split_name: str = "data",
    require_label: bool = True,
    time_jitter: float = 0.1,
) -> Tracks:
    """Validate a long table and cut it into gap-free segments.

    Checks, in order, each raising :class:`InputError` with the file, column and row: missing
    columns, a missing time or sequence value, non-numeric values, inf or float32 overflow
    (:func:`check_values`), duplicate (sequence, time) rows, times that go backwards within a
    sequence (rows must be sorted by time within each sequence: they are not sorted for you;
    sequences may interleave, as ETH/UCY's frame-major files do), and the sampling-rate rules
    (:func:`domains.autonomous.sampling.check_sampling`) on the rows as read, with ``time_step``
    (``None``: the median step of this table's tracks) and ``time_jitter``.

    Rows with NaN in a used column are handled by ``nan_policy``: ``drop`` removes them,
    ``ffill`` carries the last value forward within the sequence, ``interpolate`` fills linearly
    between neighbours in the sequence; rows that cannot be filled (leading NaNs) are dropped.
    A dropped row leaves a time gap. Consecutive rows further apart than ``max_gap`` time steps
    start a new segment.
    """
    if nan_policy not in NAN_POLICIES:
        raise InputError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    check_values(table, spec, require_label)
    label_column = spec.label if spec.label is not None and spec.label in table.columns else None
    time = time_seconds(table, spec.time)
    targets = np.stack([_numeric(table, c) for c in spec.targets], 1) if spec.targets else np.zeros((len(table), 0))
    channels = np.stack([_numeric(table, c) for c in spec.channels], 1) if spec.channels else np.zeros((len(table), 0))
    label = None
    if label_column is not None:
        label = _numeric(table, label_column) if spec.label_numeric else table[label_column].to_numpy(dtype=object)
    categories = table[list(spec.categorical)].to_numpy(dtype=object) if spec.categorical else None
    seq_codes, seq_names = pd.factorize(table[spec.sequence].astype(str), sort=False)
    order = np.lexsort((np.arange(len(table)), seq_codes))  # group by sequence, keep file order inside
    codes, time_sorted = seq_codes[order], time[order]
    same = codes[1:] == codes[:-1]
    step = np.diff(time_sorted)
    dup = np.flatnonzero(same & (step == 0))
    if len(dup):
        (file_a, row_a), (file_b, row_b) = origin(table, order[dup[0]]), origin(table, order[dup[0] + 1])
        rows = f"{file_a} rows {row_a} and {row_b}" if file_a == file_b else f"{file_a} row {row_a} and {file_b} row {row_b}"
        raise InputError(
            f"{rows}: duplicate (sequence, time) = ({seq_names[codes[dup[0]]]!r}, {time_sorted[dup[0]]:g}) "
            f"in columns {spec.sequence!r}, {spec.time!r} ({int(dup.size)} duplicate row(s)); expected one row per sequence and time"
        )
    back = np.flatnonzero(same & (step < 0))
    if len(back):
        b = order[back[0] + 1]
        raise InputError(
            f"{where(table, b)}: time {time_sorted[back[0] + 1]:g} of sequence {seq_names[codes[back[0]]]!r} comes after "
            f"{time_sorted[back[0]]:g}; column {spec.time!r} must be sorted within each sequence"
        )
    if time_step is None:
        time_step = infer_time_step(step[same]) or 1.0
    check_sampling(time_sorted, codes, seq_names, time_step, time_jitter, max_gap, lambda i: origin(table, order[i]), split_name)
    targets, channels, time = targets[order], channels[order], time_sorted
    label = label[order] if label is not None else None
    categories = categories[order] if categories is not None else None

    # the NaN rule is for the model's inputs only: a missing target is never made up (filled or interpolated); the
    # row stays, and a window whose target (at its last observed row) is missing is dropped and counted by the windows
    report = {"rows": len(table), "nan_rows": 0, "filled_rows": 0, "dropped_rows": 0}
    report["missing_targets"] = int(pd.isna(label).sum()) if label is not None else 0
    numeric = np.concatenate([targets, channels], 1)
    nan = np.isnan(numeric).any(1)
    if categories is not None:  # a blank category is a missing value: the NaN rule fills (last value) or drops it
        nan |= pd.isna(categories).any(1)
    report["nan_rows"] = int(nan.sum())
    keep = ~nan
    if nan.any() and nan_policy != "drop":
        filled = _fill(numeric, codes, nan_policy)
        ok_categories = np.ones(len(time), bool)
        if categories is not None:  # text: the last value (per sequence), for every fill policy
            categories = pd.DataFrame(categories).groupby(codes).ffill().to_numpy(dtype=object)
            ok_categories &= ~pd.isna(categories).any(1)
        keep = ~np.isnan(filled).any(1) & ok_categories
        report["filled_rows"] = int((nan & keep).sum())
        d, c = targets.shape[1], channels.shape[1]
        targets, channels = filled[:, :d], filled[:, d : d + c]
    report["dropped_rows"] = int((~keep).sum())
    targets, channels, time, codes = targets[keep], channels[keep], time[keep], codes[keep]
    label = label[keep] if label is not None else None
    categories = np.vectorize(category_text, otypes=[object])(categories[keep]) if categories is not None else None

    gap = gap_mask(time, codes, time_step, max_gap)
    # no row left (every row dropped by the NaN rule: a streamed piece may be one such sequence): no segment
    boundary = np.concatenate([[len(time) > 0], (codes[1:] != codes[:-1]) | gap])
    report["gaps"] = int(gap.sum())
    starts = np.flatnonzero(boundary)
    lengths = np.diff(np.append(starts, len(time)))
    names, counter = [], {}
    for start in starts:
        name = str(seq_names[codes[start]])
        k = counter[name] = counter.get(name, -1) + 1
        names.append(name if k == 0 else f"{name}/{k}")
    report["sequences"] = len(seq_names)
    report["segments"] = len(starts)
    report["time_step"] = time_step  # type: ignore[assignment]
    # positions stay float64: windows are centred on their last observed position before the float32 cast
    # (domains.autonomous.windows.window_tensors), so UTM-sized coordinates keep their centimetres
    return Tracks(names, starts, lengths, time, targets.astype(np.float64), channels.astype(np.float32), label, report, categories)


def log(message: str) -> None:
    """Data-preparation messages go to stderr (the run's log)."""
    print(f"[autonomous] {message}", file=sys.stderr)
