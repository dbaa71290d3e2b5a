"""Whether ISO 8601 times are written with a time zone: one column must not mix the two kinds.

A time with a zone (``+02:00``, ``Z``) is converted to UTC and a time without one is taken as UTC as written, so a
column mixing them moves one kind against the other by the zone's offset, in silence (hour features, time splits).
Finance's timestamp features (``domains.finance.parsing``) and the shared time split (``pipelines.splits``) refuse it.

Example:
    >>> import pandas as pd
    >>> written_with_zone(pd.Series(["2024-01-01T10:00:00+02:00", "2024-01-01 10:00:00", "2024-01-01", "2024-01-01T10:00Z"])).tolist()
    [True, False, False, True]
"""

from __future__ import annotations

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
