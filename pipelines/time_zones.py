"""Whether ISO 8601 times are written with a time zone: one column must not mix the two kinds.

A time with a zone (``+02:00``, ``Z``) is converted to UTC and a time without one is taken as UTC as written, so a
column mixing them moves one kind against the other by the zone's offset, in silence (hour features, time splits).
Finance's timestamp features (``domains.finance.parsing``) and the shared time split (``pipelines.splits``) refuse it;
a column read in chunks carries the first row of each kind from chunk to chunk (:class:`FirstOfEachKind`), so a file whose
first chunk is all without a zone and a later one all with is refused as the whole file would be.

Example:
    >>> import pandas as pd
    >>> written_with_zone(pd.Series(["2024-01-01T10:00:00+02:00", "2024-01-01 10:00:00", "2024-01-01", "2024-01-01T10:00Z"])).tolist()
    [True, False, False, True]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from pipelines.errors import InputError

#: an ISO 8601 zone designator ending the text (``+02:00``, ``-0500``, ``+02``, ``Z``); a date alone (``2024-01-01``, which
#: ends like ``-01``) is at most 10 characters, so only longer text is a time with a zone. (A simple pattern anchored at the
#: end: one naming the time of day too took pyarrow's regex engine 3 s per million values, the parse itself 1 s.)
ZONE_SUFFIX = r"(?:[zZ]|[+-]\d{2}(?::?\d{2})?)$"


def written_with_zone(values: pd.Series) -> np.ndarray:
    """Which values (as text, stripped) end with a time zone designator; missing values are ``False``."""
    text = values.astype(str).str.strip()
    return (text.str.contains(ZONE_SUFFIX, regex=True) & (text.str.len() > 10)).to_numpy(dtype=bool, na_value=False)


def mixed_zone_positions(values: pd.Series) -> tuple[int, int] | None:
    """The positions of the first time written with a zone and of the first ISO 8601 time without one, when a column of text
    holds both (``None`` otherwise: datetime or numeric columns, one kind only; numbers are not times without a zone).

    Example:
        >>> mixed_zone_positions(pd.Series(["1.5", "2024-01-01T10:00:00", None, "2024-01-01T10:00:00+02:00"]))
        (3, 1)
    """
    if pd.api.types.is_datetime64_any_dtype(values) or pd.api.types.is_numeric_dtype(values):
        return None
    zoned = written_with_zone(values)
    dated = values.astype(str).str.strip().str.match(r"^\d{4}-\d{2}-\d{2}").to_numpy(dtype=bool, na_value=False) & values.notna().to_numpy()
    naive = dated & ~zoned
    if not (zoned.any() and naive.any()):
        return None
    return int(np.flatnonzero(zoned)[0]), int(np.flatnonzero(naive)[0])


def refuse_mixed_zones(values: pd.Series, column: str, where: Callable[[int], str]) -> None:
    """Refuse a column of text mixing times with a zone and ISO 8601 times without (:func:`mixed_zone_positions`), naming
    a row of each (``where(position)``: e.g. ``fleet.csv row 12``; ``column``: e.g. ``column 't' (--data.time_column)``)."""
    mixed = mixed_zone_positions(values)
    if mixed is not None:
        z, n = mixed
        raise InputError(
            f"{where(z)}, {column}: a time with a time zone ({values.iloc[z]!r}), and {where(n)} one without ({values.iloc[n]!r}); "
            "times without a zone would be taken as UTC, shifting them against the others by their offset (row order, time steps, "
            "gaps). Write every time of the column one way (all with their offset, e.g. in UTC with Z, or all in one local time without)"
        )


class FirstOfEachKind:
    """The first row (1-based, with its value) written with a time zone and the first written without, over the chunks
    of one column read in order: a chunk all of one kind after a chunk all of the other is then a mix, as in the whole file.

    Example:
        >>> seen = FirstOfEachKind()
        >>> seen.add(pd.Series(["2024-01-01 10:00:00", "2024-01-01 11:00:00"]), first_row=1)
        >>> seen.add(pd.Series(["2024-01-02T10:00:00+02:00"]), first_row=3)
        >>> seen.mixed, seen.zoned, seen.naive
        (True, (3, '2024-01-02T10:00:00+02:00'), (1, '2024-01-01 10:00:00'))
    """

    def __init__(self) -> None:
        self.zoned: tuple[int, Any] | None = None  # (row, value) of the first time with a zone
        self.naive: tuple[int, Any] | None = None  # (row, value) of the first time without

    def add(self, values: pd.Series, first_row: int) -> None:
        """Note the first row of each kind in ``values``, whose first value is row ``first_row`` of the file."""
        zoned = written_with_zone(values)
        if self.zoned is None and zoned.any():
            at = int(np.flatnonzero(zoned)[0])
            self.zoned = (at + first_row, values.iloc[at])
        if self.naive is None and not zoned.all():
            at = int(np.flatnonzero(~zoned)[0])
            self.naive = (at + first_row, values.iloc[at])

    @property
    def mixed(self) -> bool:
        return self.zoned is not None and self.naive is not None
