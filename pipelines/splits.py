"""Split rules shared by every domain's data module: which rows are train, val and test.

``--data.split_by`` chooses the rule (:class:`SplitRule`); each data module reads its table, then
calls :func:`assign` for the stable rules and keeps its own seeded ``random`` split (the default,
unchanged, so earlier results do not move):

- ``random``: the domain's seeded split (stratified, per sequence, or the source's official split).
  Adding rows re-draws it: rows that were held back can land in training after a retrain.
- ``hash``: each value of ``--data.split_key`` (a patient, an account, a vehicle, a file) goes to a
  split by a keyed BLAKE2b hash of its text, salted with ``--data.split_seed``: the split of a key
  depends on that key alone, so appending rows never moves an earlier row, and all rows of one key
  stay together. The shares approach ``val_fraction`` / ``test_fraction`` as keys grow in number.
- ``time``: rows after ``--data.test_after`` are test, rows after ``--data.val_after`` (and not after
  ``test_after``) are val, the rest train: nothing after the cutoff trains. Without ``val_after``
  the last ``val_fraction`` of the rows before ``test_after`` (in time) are val; without any cutoff
  the last ``test_fraction`` / ``val_fraction`` of all rows in time (ties stay together). The time
  column holds numbers or ISO 8601 times (``2024-05-01``, ``2024-05-01T12:00:00Z``).
- ``column``: ``--data.split_column`` names ``train`` / ``val`` / ``test`` per row (case and spaces
  ignored); giving ``split_column`` alone selects it.

The rule is part of the data module's saved state (:meth:`SplitRule.as_dict`, in every checkpoint):
``test`` and ``predict`` with a checkpoint use it (:func:`adopt`), and ``pipelines.retrain`` refuses
an attempt whose rule differs from the pinned evaluation set's (:func:`rule_of_config`).

Example:
    >>> rule = SplitRule.from_options("hash", split_key="patient", val_fraction=0.2, test_fraction=0.2)
    >>> frame = pd.DataFrame({"patient": ["a", "b", "a", "c"]})
    >>> list(assign(rule, frame, "x.csv")) == list(assign(rule, frame.iloc[:3], "x.csv")) + [assign(rule, frame, "x.csv")[3]]
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipelines.errors import InputError, did_you_mean
from pipelines.time_zones import FirstOfEachKind
from pipelines.validation import describe_rows

SPLITS = ("train", "val", "test")
SplitBy = Literal["random", "hash", "time", "column"]
RULES = ("random", "hash", "time", "column")
#: The data options that make up a split rule (in a resolved ``data`` config section).
SPLIT_OPTIONS = ("split", "split_by", "split_key", "split_column", "time_column", "test_after", "val_after", "val_fraction", "test_fraction", "split_seed")


@dataclass(frozen=True)
class SplitRule:
    """How rows are assigned to train/val/test (see the module docstring); ``as_dict`` is what a checkpoint holds."""

    by: str = "random"
    key: str | None = None
    column: str | None = None
    time_column: str | None = None
    test_after: str | None = None
    val_after: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0

    @classmethod
    def from_options(
        cls, split_by: str | None = "random", split_key: str | None = None, split_column: str | None = None, time_column: str | None = None,
        test_after: Any = None, val_after: Any = None, val_fraction: float = 0.15, test_fraction: float = 0.15, split_seed: int = 0,
    ) -> SplitRule:  # fmt: skip
        """The rule of the ``--data.*`` options, checked before any file is read (:class:`InputError`)."""
        by = split_by or "random"
        if by == "random" and split_column:
            by = "column"  # --data.split_column alone selects the column rule (as before this module)
        if by not in RULES:
            raise InputError(f"--data.split_by {by!r}: expected one of {', '.join(RULES)}{did_you_mean(by, RULES)}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise InputError(f"--data.val_fraction ({val_fraction}) and --data.test_fraction ({test_fraction}) must be in (0, 1) and sum below 1")
        needs = {"hash": ("split_key", split_key), "column": ("split_column", split_column), "time": ("time_column", time_column)}
        if by in needs and not needs[by][1]:
            raise InputError(f"--data.split_by {by} needs --data.{needs[by][0]} (the column it splits by)")
        if split_key and by != "hash":
            raise InputError(f"--data.split_key {split_key!r} is used by --data.split_by hash, not {by}; add --data.split_by hash")
        if (test_after is not None or val_after is not None) and by != "time":
            raise InputError(f"--data.test_after / --data.val_after are cutoffs of --data.split_by time, not {by}; add --data.split_by time")
        if val_after is not None and test_after is None:
            raise InputError("--data.val_after needs --data.test_after (val is the rows between the two cutoffs)")
        text = (lambda v: None if v is None else str(v))  # noqa: E731  (YAML may give a date or a number)
        return cls(by, split_key if by == "hash" else None, split_column if by == "column" else None,
                   time_column if by == "time" else None, text(test_after), text(val_after), float(val_fraction), float(test_fraction), int(split_seed))  # fmt: skip

    @property
    def stable(self) -> bool:
        """Whether an earlier row keeps its split when rows are added (every rule but ``random``)."""
        return self.by != "random"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> SplitRule:
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})

    def describe(self) -> str:
        """The rule as options, e.g. ``--data.split_by hash --data.split_key patient (seed 0, val 0.15, test 0.15)``."""
        parts = {"hash": f" --data.split_key {self.key}", "column": f" --data.split_column {self.column}", "random": ""}
        if self.by == "time":
            cuts = "".join(f" --data.{n} {v}" for n, v in (("test_after", self.test_after), ("val_after", self.val_after)) if v is not None)
            parts["time"] = f" --data.time_column {self.time_column}{cuts}"
        return f"--data.split_by {self.by}{parts[self.by]} (seed {self.seed}, val {self.val_fraction:g}, test {self.test_fraction:g})"


def check_column(columns: Sequence[Any], column: str, option: str, source: str) -> None:
    """Refuse a column the table does not have, with the closest names."""
    names = [str(c) for c in columns if not str(c).startswith("_")]
    if column not in names:
        raise InputError(f"{source}: column {column!r} (--data.{option}) not found{did_you_mean(column, names)}; the file has columns {names}")


def hash_unit(values: Sequence[Any], seed: int) -> np.ndarray:
    """A number in [0, 1) per value from a keyed BLAKE2b of its text: the same value, the same number,
    in every process and Python version (unlike ``hash()``, salted per process)."""
    key = str(int(seed)).encode()
    text = pd.Series(values, dtype=object).astype(str)
    unique = text.unique()
    units = {v: int.from_bytes(hashlib.blake2b(v.encode("utf-8"), digest_size=8, key=key).digest(), "big") / 2.0**64 for v in unique}
    return text.map(units).to_numpy(dtype=np.float64)


def hash_split(values: Sequence[Any], val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """``train``/``val``/``test`` per value: val below ``val_fraction``, test in the next ``test_fraction``."""
    unit = hash_unit(values, seed)
    return np.where(unit < val_fraction, "val", np.where(unit < val_fraction + test_fraction, "test", "train")).astype(str)


def parse_times(values: pd.Series, column: str, source: str, first_row: int = 1, seen: FirstOfEachKind | None = None) -> tuple[np.ndarray, bool]:
    """``(float64 per row, whether they are datetimes)``: numbers as they are, else ISO 8601 times as
    nanoseconds since the epoch (UTC; a time without a zone is taken as UTC). A value that is neither
    (or missing) is refused, naming its row, and so are times with and without a time zone in one column
    (``seen``: what the earlier chunks of a column read in chunks held, :class:`pipelines.time_zones.FirstOfEachKind`)."""
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna().to_numpy()
    if not bad.all() and not bad.any():
        return numeric.to_numpy(dtype=np.float64), False
    times = pd.to_datetime(values.astype(str), errors="coerce", utc=True, format="ISO8601")
    bad = times.isna().to_numpy()
    if bad.any():
        rows = np.flatnonzero(bad)
        raise InputError(
            f"{source} {describe_rows(rows + first_row)}, column {column!r} (--data.time_column): value {values.iloc[rows[0]]!r} is neither "
            f"a number nor an ISO 8601 time (e.g. 2024-05-01 or 2024-05-01T12:00:00Z); {len(rows)} such row(s)"
        )
    seen = seen if seen is not None else FirstOfEachKind()
    seen.add(values, first_row)
    if seen.mixed:  # a time without a zone is taken as UTC as written: one kind moves against the other
        (with_zone, zoned_value), (without, naive_value) = seen.zoned, seen.naive
        raise InputError(
            f"{source}, column {column!r} (--data.time_column): row {with_zone} holds a time with a time zone "
            f"({zoned_value!r}) and row {without} one without ({naive_value!r}); times without a zone "
            "would be taken as UTC, shifting them against the others by their offset and moving rows across the split's cutoff. "
            "Write every time of the column one way (all with their offset, e.g. in UTC with Z, or all in one local time without)"
        )
    return times.astype("datetime64[ns, UTC]").astype("int64").to_numpy(dtype=np.float64), True


def parse_cutoff(value: str, is_datetime: bool, option: str) -> float:
    """A cutoff in the time column's unit (a number, or an ISO 8601 time for a datetime column)."""
    try:
        if is_datetime:
            stamp = pd.Timestamp(value)
            return float((stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp).as_unit("ns").value)
        return float(value)
    except (ValueError, TypeError):
        kind = "an ISO 8601 time (the time column holds times)" if is_datetime else "a number (the time column holds numbers)"
        raise InputError(f"--data.{option} {value!r}: expected {kind}") from None


def time_split(times: np.ndarray, rule: SplitRule, is_datetime: bool = False) -> np.ndarray:
    """``train``/``val``/``test`` per row by time (see the module docstring)."""

    def last(mask: np.ndarray, share: float) -> float:  # the cutoff leaving the latest ``share`` of ``mask``'s rows after it
        chosen = np.sort(times[mask])
        if len(chosen) == 0:
            return np.inf
        return float(chosen[max(0, min(len(chosen) - 1, len(chosen) - 1 - round(len(chosen) * share)))])

    everything = np.ones(len(times), bool)
    test_after = parse_cutoff(rule.test_after, is_datetime, "test_after") if rule.test_after is not None else last(everything, rule.test_fraction)
    if rule.val_after is not None:
        val_after = parse_cutoff(rule.val_after, is_datetime, "val_after")
        if val_after >= test_after:
            raise InputError(f"--data.val_after {rule.val_after} must be before --data.test_after {rule.test_after}")
    else:
        share = rule.val_fraction if rule.test_after is not None else rule.val_fraction / (1 - rule.test_fraction)
        val_after = last(times <= test_after, share)
    return np.where(times > test_after, "test", np.where(times > val_after, "val", "train")).astype(str)


def column_split(values: pd.Series, column: str, source: str, first_row: int = 1) -> np.ndarray:
    """The ``train``/``val``/``test`` a split column names per row; another value is refused with its row."""
    split = values.astype(str).str.strip().str.lower()
    bad = np.flatnonzero(~split.isin(SPLITS).to_numpy())
    if len(bad):
        shown = sorted({str(v) for v in values.iloc[bad]})[:5]
        raise InputError(
            f"{source} {describe_rows(bad + first_row)}, column {column!r} (--data.split_column): value {values.iloc[bad[0]]!r}; "
            f"expected train, val or test ({len(bad)} row(s) with other values: {shown})"
        )
    return split.to_numpy().astype(str)


def assign(rule: SplitRule, frame: pd.DataFrame, source: str, first_row: int = 1, seen: FirstOfEachKind | None = None) -> np.ndarray:
    """``train``/``val``/``test`` per row of ``frame`` under a stable rule (``random`` is the domain's own); ``seen``: the
    time-zone kinds of the time column's earlier chunks, for a table read in chunks (:func:`parse_times`)."""
    if rule.by == "random":
        raise ValueError("the random split is drawn by each data module")
    column = {"hash": rule.key, "time": rule.time_column, "column": rule.column}[rule.by]
    option = {"hash": "split_key", "time": "time_column", "column": "split_column"}[rule.by]
    check_column(list(frame.columns), column, option, source)
    values = frame[column]
    if rule.by == "hash":
        # an empty cell is no key whether the reader made it NaN or kept it as text (finance reads CSVs with keep_default_na=False)
        text = pd.api.types.is_object_dtype(values) or pd.api.types.is_string_dtype(values)
        blank = values.astype("string").str.strip().eq("").fillna(False).to_numpy(dtype=bool) if text else np.zeros(len(values), dtype=bool)
        missing = np.flatnonzero(values.isna().to_numpy() | blank)
        if len(missing):
            raise InputError(f"{source} {describe_rows(missing + first_row)}, column {column!r} (--data.split_key): no key value; every row needs one")
        return hash_split(values.to_numpy(), rule.val_fraction, rule.test_fraction, rule.seed)
    if rule.by == "time":
        times, is_datetime = parse_times(values, column, source, first_row, seen)
        return time_split(times, rule, is_datetime)
    return column_split(values, column, source, first_row)


def check_filled(assignment: np.ndarray, rule: SplitRule, source: str) -> None:
    """Refuse a split left empty, naming the rule and how many rows each split got."""
    counts = {name: int((assignment == name).sum()) for name in SPLITS}
    empty = [name for name in SPLITS if counts[name] == 0]
    if empty:
        hint = {"hash": "more distinct keys, or other fractions", "time": "other cutoffs (rows after test_after are test)",
                "column": "rows of every split in the column", "random": "more rows, or other fractions"}[rule.by]  # fmt: skip
        raise InputError(f"{source}: {'split' if len(empty) == 1 else 'splits'} {' and '.join(map(repr, empty))} {'is' if len(empty) == 1 else 'are'} empty under {rule.describe()}: {counts} rows; give {hint}")


def check_groups(keys: Sequence[Any], assignment: np.ndarray, column: str, source: str) -> None:
    """Refuse a key whose rows lie in two splits (e.g. one patient's images in train and test)."""
    frame = pd.DataFrame({"key": pd.Series(keys, dtype=object).astype(str).to_numpy(), "split": assignment})
    spread = frame.groupby("key")["split"].nunique()
    crossing = spread[spread > 1]
    if len(crossing):
        first = crossing.index[0]
        where = sorted(frame.loc[frame["key"] == first, "split"].unique())
        raise InputError(
            f"{source}: {len(crossing)} value(s) of {column!r} have rows in more than one split (e.g. {first!r} in {where}): the model "
            f"would be tested on what it trained on; use --data.split_by hash --data.split_key {column}"
        )


def adopt(current: SplitRule, saved: dict[str, Any] | None, default: SplitRule) -> SplitRule:
    """The rule to use with a checkpoint that recorded ``saved``: the checkpoint's when this command
    gave none (``current == default``), ``current`` when they agree; otherwise refused, since the
    test split could hold rows the checkpoint trained on."""
    if not saved:
        return current
    recorded = SplitRule.from_dict(saved)
    if recorded == current or current == default:
        return recorded
    raise InputError(
        f"the checkpoint was trained with the split {recorded.describe()} but this command splits by {current.describe()}: "
        "its val and test rows could be training rows of the checkpoint; give the checkpoint's split options (or none: it is then used)"
    )


def rule_of_config(data: dict[str, Any]) -> dict[str, Any]:
    """The split options of a resolved ``data`` config section (to compare two configs' rules)."""
    return {name: data.get(name) for name in SPLIT_OPTIONS if name in data}


def is_stable_config(data: dict[str, Any]) -> bool:
    """Whether a ``data`` section splits by a stable rule (hash, time, or a split column)."""
    return (data.get("split_by") or "random") != "random" or bool(data.get("split_column"))
