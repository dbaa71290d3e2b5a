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

from typing import Any

import numpy as np
import pandas as pd

#: an ISO 8601 zone designator ending the text (``+02:00``, ``-0500``, ``+02``, ``Z``); a date alone (``2024-01-01``, which
#: ends like ``-01``) is at most 10 characters, so only longer text is a time with a zone. (A simple pattern anchored at the
#: end: one naming the time of day too took pyarrow's regex engine 3 s per million values, the parse itself 1 s.)
ZONE_SUFFIX = r"(?:[zZ]|[+-]\d{2}(?::?\d{2})?)$"


def written_with_zone(values: pd.Series) -> np.ndarray:
    """Which values (as text, stripped) end with a time zone designator; missing values are ``False``."""
    text = values.astype(str).str.strip()
    return (text.str.contains(ZONE_SUFFIX, regex=True) & (text.str.len() > 10)).to_numpy(dtype=bool, na_value=False)


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
