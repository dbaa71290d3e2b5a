"""Cell parsing of transaction tables: text or typed columns -> numbers, booleans, times, labels.

Every function checks every value and raises :class:`pipelines.errors.InputError` (a
``ValueError``) naming the source, the column and the 1-based data rows (the header not counted).

Missing values: an empty cell, ``NA``, ``N/A``, ``null``, ``None``, ``nan``/``NaN`` or ``NaT`` (and a
null/NaN in a typed Parquet or DataFrame column) is a *missing value*: the preprocessing imputes it
(numeric: the training median; boolean: the training share of true; timestamp: the circle's centre;
categorical: its own ``<missing>`` value). Infinite values (``inf``, ``-inf``) and magnitudes beyond
float32's range (``|x| > 3.4e38``, e.g. ``1e300``) are never missing values: they are refused
(``pipelines.validation``'s rule), as is text that is not a number.

Example:
    >>> parse_numeric(pd.Series(["1.5", "", "2"], name="amount"), "t.csv").tolist()
    [1.5, nan, 2.0]
    >>> parse_numeric(pd.Series(["1.5", "1e300"], name="amount"), "t.csv")
    Traceback (most recent call last):
    ...
    pipelines.errors.InputError: t.csv: column 'amount' holds a magnitude beyond float32's range (3.4e+38) at row 2; every value must be a finite number within float32's range (|x| <= 3.4e+38); an empty cell is a missing value (imputed)
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from pipelines.errors import InputError
from pipelines.time_zones import written_with_zone
from pipelines.validation import FLOAT32_MAX, check_labels, describe_rows, non_finite_problem

MISSING = "<missing>"
MISSING_TOKENS = frozenset({"", "nan", "NaN", "NAN", "NA", "N/A", "null", "NULL", "None", "none", "NaT"})
TRUE_TOKENS = frozenset({"true", "1", "1.0", "yes", "y", "t"})
FALSE_TOKENS = frozenset({"false", "0", "0.0", "no", "n", "f"})

RowPositions = int | np.ndarray
"""Where a frame's rows sit in its file: the offset of its first row, or every row's 0-based position."""


def row_numbers(mask: np.ndarray, row_offset: RowPositions) -> np.ndarray:
    """1-based data-row numbers (the header is not counted) of the rows where ``mask`` is true."""
    positions = np.flatnonzero(mask)
    rows = row_offset[positions] if isinstance(row_offset, np.ndarray) else positions + row_offset
    return np.asarray(rows, dtype=np.int64) + 1


def _rows(mask: np.ndarray, row_offset: RowPositions, limit: int = 5) -> str:
    """``3, 9, 12`` for the first offending rows (1-based)."""
    return ", ".join(str(int(r)) for r in row_numbers(mask, row_offset)[:limit])


def _is_missing(series: pd.Series) -> np.ndarray:
    missing = np.array(series.isna().to_numpy(), dtype=bool)  # a writable copy (pandas copy-on-write)
    if series.dtype == object or pd.api.types.is_string_dtype(series.dtype):
        missing |= series.astype(str).str.strip().isin(MISSING_TOKENS).to_numpy()
    return missing


def _to_float(series: pd.Series) -> np.ndarray:
    """Numbers and numeric text as float64, anything else NaN. A Python integer beyond float64 (a JSON
    request's ``10**309``; pandas raises ``OverflowError`` on it) becomes float64's largest value of its
    sign, so the float32-range check names it as the magnitude it is."""
    try:
        return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    except OverflowError:
        huge = series.map(lambda v: isinstance(v, int) and not isinstance(v, bool) and abs(v) > sys.float_info.max)
        capped = series.mask(huge, series[huge].map(lambda v: sys.float_info.max if v > 0 else -sys.float_info.max))
        return pd.to_numeric(capped, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def parse_numeric(series: pd.Series, source: str, row_offset: RowPositions = 0) -> np.ndarray:
    """Finite float32-range numbers as float64 (missing -> NaN); text, infinity and overflow are errors naming the rows."""
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.astype(float).to_numpy()
    if pd.api.types.is_numeric_dtype(series.dtype):
        values = series.to_numpy(dtype=float, na_value=np.nan)
    else:
        missing = _is_missing(series)
        values = _to_float(series.where(~missing))
        bad = np.isnan(values) & ~missing  # text "inf" / "1e400" parses to inf: refused below as infinite
        if bad.any():
            example = series.iloc[int(np.flatnonzero(bad)[0])]
            raise InputError(
                f"{source}: column {series.name!r} should be numeric but has {int(bad.sum())} non-numeric value(s), "
                f"first at data row(s) {_rows(bad, row_offset)} (e.g. {example!r})"
            )
    present = values[~np.isnan(values)] if values.size else values
    found = non_finite_problem(np.where(np.isnan(values), 0.0, values)) if present.size else None
    if found is not None:
        mask, what = found
        raise InputError(
            f"{source}: column {series.name!r} holds {what} at {describe_rows(row_numbers(mask, row_offset))}; every value must be a "
            f"finite number within float32's range (|x| <= {FLOAT32_MAX:.2g}); an empty cell is a missing value (imputed)"
        )
    return values


def parse_boolean(series: pd.Series, source: str, row_offset: RowPositions = 0) -> np.ndarray:
    """0/1 as float64 (missing -> NaN)."""
    if pd.api.types.is_bool_dtype(series.dtype) or pd.api.types.is_numeric_dtype(series.dtype):
        values = series.to_numpy(dtype=float, na_value=np.nan)
        bad = ~np.isnan(values) & ~np.isin(values, (0.0, 1.0))
    else:
        missing = _is_missing(series)
        text = series.astype(str).str.strip().str.lower()
        values = np.where(text.isin(TRUE_TOKENS), 1.0, np.where(text.isin(FALSE_TOKENS), 0.0, np.nan))
        values[missing] = np.nan
        bad = np.isnan(values) & ~missing
    if bad.any():
        example = series.iloc[int(np.flatnonzero(bad)[0])]
        raise InputError(
            f"{source}: column {series.name!r} should be boolean (true/false, 1/0, yes/no) but has {int(bad.sum())} other "
            f"value(s), first at data row(s) {_rows(bad, row_offset)} (e.g. {example!r})"
        )
    return values


def parse_timestamp(series: pd.Series, source: str, row_offset: RowPositions = 0, zones: TimestampZones | None = None) -> pd.Series:
    """Datetimes in UTC (naive values are taken as they are). Text must be ISO 8601
    (``2024-05-01 13:45:00``, ``2024-05-01T13:45:00+02:00``): ``03/01/2024`` is 3 January in one
    country and 1 March in another, and a guess read a day-first file month-first whenever every
    day was 12 or less (silently wrong weekdays), so any other layout is refused. Values with a time
    zone and values without are never mixed (:class:`TimestampZones`: ``zones`` carries what earlier
    chunks held, and the kind a model was trained on; by default the rows of ``series`` alone)."""
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        (zones if zones is not None else TimestampZones()).add(series, source, row_offset)
        return series.dt.tz_localize("UTC") if series.dt.tz is None else series.dt.tz_convert("UTC")
    missing = _is_missing(series)
    parsed = pd.to_datetime(series.where(~missing), errors="coerce", utc=True, format="ISO8601")
    bad = parsed.isna().to_numpy() & ~missing
    if bad.any():
        example = series.iloc[int(np.flatnonzero(bad)[0])]
        raise InputError(
            f"{source}: column {series.name!r} should hold ISO 8601 timestamps (e.g. 2024-05-01 13:45:00) but has {int(bad.sum())} "
            f"other value(s), first at data row(s) {_rows(bad, row_offset)} (e.g. {example!r}); dates such as 03/01/2024 are "
            "ambiguous (day or month first): write the column as ISO 8601 (or as a Parquet timestamp column)"
        )
    (zones if zones is not None else TimestampZones()).add(series, source, row_offset, missing)
    return parsed


#: :func:`zone_kinds`' kinds: a timestamp written with a time zone (``+02:00``, ``Z``) or without one
ZONED, NAIVE = "zoned", "naive"
ZONE_WORDS = {ZONED: "with a time zone (an offset such as +02:00, or Z)", NAIVE: "without a time zone"}


def zone_kinds(series: pd.Series, missing: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``{ZONED: mask, NAIVE: mask}``: which rows hold a timestamp written with a time zone and which without one (a
    missing value is neither; ``missing``: :func:`_is_missing` of ``series`` when already known).

    Example:
        >>> kinds = zone_kinds(pd.Series(["2024-01-01T10:00:00+02:00", "2024-01-01 10:00:00", "", "2024-01-01", "2024-01-01T10:00Z"]))
        >>> kinds[ZONED].tolist(), kinds[NAIVE].tolist()
        ([True, False, False, False, True], [False, True, False, True, False])
    """
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        present = series.notna().to_numpy()
        zoned = present if series.dt.tz is not None else np.zeros(len(series), dtype=bool)
    else:
        present = ~(_is_missing(series) if missing is None else missing)
        zoned = written_with_zone(series) & present  # pipelines.time_zones: the time split reads them alike
    return {ZONED: zoned, NAIVE: present & ~zoned}


class TimestampZones:
    """Which kind of timestamps (:data:`ZONED` or :data:`NAIVE`) each timestamp column holds, over every chunk of one
    file (the streamed reader keeps one across chunks). A zoned value is converted to UTC and a value without a zone is
    taken as UTC as written, so a column mixing the two shifts the hour and weekday features of one kind against the
    other's in silence: :meth:`add` refuses the mix naming a row of each kind, and with ``expected`` (the kinds a model
    was trained on, :attr:`TablePreprocessor.timestamp_zones`) a value of the other kind.

    Example:
        >>> zones = TimestampZones()
        >>> zones.add(pd.Series(["2024-01-01T10:00:00+02:00"], name="t"), "a.csv")
        >>> zones.add(pd.Series(["2024-01-01 10:00:00"], name="t"), "a.csv", 1)
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: a.csv: column 't' mixes timestamps with a time zone (an offset such as +02:00, or Z) (data row 1: '2024-01-01T10:00:00+02:00') and timestamps without a time zone (data row 2: '2024-01-01 10:00:00'): a value with a zone is converted to UTC and one without is taken as UTC as written, so the hour and weekday features of one kind would be shifted against the other's in silence. Expected every value of the column with a zone or every value without: write the column one way (e.g. every time in UTC with its offset)
    """

    def __init__(self, expected: dict[str, str] | None = None) -> None:
        self.expected = dict(expected or {})
        self.first: dict[str, dict[str, tuple[int, Any]]] = {}  # column -> kind -> (1-based data row, value) of its first row

    def add(self, series: pd.Series, source: str, row_offset: RowPositions = 0, missing: np.ndarray | None = None) -> None:
        kinds, column = zone_kinds(series, missing), str(series.name)
        seen = self.first.setdefault(column, {})
        for kind, hits in kinds.items():
            if kind not in seen and hits.any():
                seen[kind] = (int(row_numbers(hits, row_offset)[0]), series.iloc[int(np.flatnonzero(hits)[0])])
        trained = self.expected.get(column)
        other = {ZONED: NAIVE, NAIVE: ZONED}.get(trained or "")
        if other in seen:
            row, value = seen[other]
            raise InputError(
                f"{source}: column {column!r} holds timestamps {ZONE_WORDS[other]} (data row {row}: {value!r}) but the model was "
                f"trained on timestamps {ZONE_WORDS[trained]}: the hour and weekday features would be shifted in silence. "
                f"Expected every value {ZONE_WORDS[trained]}, as in training: write the column that way"
            )
        if len(seen) == 2:
            (first, (row_a, value_a)), (second, (row_b, value_b)) = sorted(seen.items(), key=lambda item: item[1][0])
            raise InputError(
                f"{source}: column {column!r} mixes timestamps {ZONE_WORDS[first]} (data row {row_a}: {value_a!r}) and timestamps "
                f"{ZONE_WORDS[second]} (data row {row_b}: {value_b!r}): a value with a zone is converted to UTC and one without "
                "is taken as UTC as written, so the hour and weekday features of one kind would be shifted against the other's in "
                "silence. Expected every value of the column with a zone or every value without: write the column one way (e.g. "
                "every time in UTC with its offset)"
            )

    @property
    def kinds(self) -> dict[str, str]:
        """The kind of every column seen with at least one value (what a fitted preprocessor keeps)."""
        return {column: next(iter(seen)) for column, seen in self.first.items() if seen}


def category_text(series: pd.Series) -> np.ndarray:
    """Category values as strings (missing -> ``<missing>``, integral floats without ``.0``)."""
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.to_numpy()
        return np.array([MISSING if np.isnan(v) else (str(int(v)) if float(v).is_integer() else str(v)) for v in values], dtype=object)
    missing = _is_missing(series)
    text = np.array(series.astype(str).str.strip().to_numpy(dtype=object), dtype=object)
    text[missing] = MISSING
    return text


def label_text(value: Any) -> str:
    """Normalise one label value for comparison with ``label_classes`` (``1``, ``1.0``, ``"1"``, ``"1.0"`` and ``True`` agree).

    Example:
        >>> [label_text(v) for v in (1, 1.0, "1", " 1.0 ", True, "1.5", "fraud")]
        ['1', '1', '1', '1', '1', '1.5', 'fraud']
    """
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    whole, dot, zeros = text.partition(".")  # "1.0": an integer label written as a float (a column with a NaN, round-tripped through pandas)
    if dot and zeros and set(zeros) == {"0"} and whole.lstrip("+-").isdigit():
        return whole
    return text


def parse_labels(series: pd.Series, classes: list[Any], source: str, row_offset: RowPositions = 0) -> np.ndarray:
    """0 (normal) / 1 (fraud) as float32; a missing label or a value outside the two classes is an error
    naming the value (with the closest class), its count and its first rows."""
    if len(classes) != 2 or label_text(classes[0]) == label_text(classes[1]):
        raise InputError(f"--data.label_classes must be two different values [normal, fraud], got {classes!r}")
    normal, fraud = (label_text(c) for c in classes)
    text = np.array([label_text(v) if not pd.isna(v) else MISSING for v in series.to_numpy(dtype=object)], dtype=object)
    text[_is_missing(series)] = MISSING
    labels = np.where(text == fraud, 1.0, 0.0).astype(np.float32)
    bad = (text != fraud) & (text != normal)
    if bad.any():
        counts = Counter(text[bad].tolist())
        first = {value: _rows(bad & (text == value), row_offset, limit=3) for value in counts}
        try:
            check_labels(counts, f"{source}: label column {series.name!r}", declared=[normal, fraud], option="--data.label_classes")
        except InputError as error:
            where = "; ".join(f"{value!r} first at data row(s) {first[value]}" for value in list(counts)[:5])
            raise InputError(f"{error} ({normal!r} = normal, {fraud!r} = fraud; a label may not be missing); {where}") from None
    return labels
