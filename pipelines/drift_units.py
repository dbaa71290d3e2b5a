"""Is a window in the reference's units? Checked by :func:`pipelines.drift.compare` before any drift statistic.

Drift is a change of distribution within one kind of data. A window of another kind, most often raw
values (amounts in currency units, durations in seconds) against reference statistics of the
model's preprocessed features (log-scaled, standardised), or a column given in cents instead of
units, differs from the reference on every statistic; calling it drift (exit 3) would send a
scheduler to retrain on data the model was never meant to see. Such a window is refused instead
(:class:`pipelines.errors.InputError`, exit 2), naming each column, its median and spread, and the reference's.

Rule, per feature, with the spread of a sample its inter-quartile range (else its 0.5-99.5 %
range, else its full range, for features that are mostly one value):

- the window's spread is at least ``UNITS_FACTOR`` (20) times the reference's, or
- the window's median is at least ``OFFSET_SPREADS`` (50) reference spreads from the reference's median.

A genuine shift, however large a drift it is, moves a feature by a few spreads (the issue's +0.3
standard deviations is 0.2 of a spread) and rarely multiplies its spread by 20. A window whose spread
collapses (a constant column, a generator that always draws the same image) is drift, not units, and
is left to the drift tests. A feature the reference holds as one value (spread 0) is not checked.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> scaled = rng.normal(size=1000)
    >>> units_mismatch("amount", scaled, np.exp(rng.normal(3.5, 1.0, size=1000))) is not None  # raw amounts against standardised ones
    True
    >>> units_mismatch("amount", scaled, scaled + 3.0) is None  # a shift of 3 standard deviations is drift, not units
    True
"""

from __future__ import annotations

import numpy as np

UNITS_FACTOR = 20.0
OFFSET_SPREADS = 50.0


def spread(values: np.ndarray) -> float:
    """Inter-quartile range, else the 0.5-99.5 % range, else the full range (0 for a constant sample)."""
    low, q1, q3, high = np.quantile(values, [0.005, 0.25, 0.75, 0.995])
    return float(q3 - q1) or float(high - low) or float(values.max() - values.min())


def units_mismatch(column: str, reference: np.ndarray, window: np.ndarray) -> str | None:
    """A sentence on ``column`` when the finite ``window`` values are not in the units of the finite ``reference`` ones, else ``None``."""
    reference_spread, window_spread = spread(reference), spread(window)
    if reference_spread == 0:
        return None
    reference_median, window_median = float(np.median(reference)), float(np.median(window))
    ratio, offset = window_spread / reference_spread, abs(window_median - reference_median) / reference_spread
    if ratio < UNITS_FACTOR and offset < OFFSET_SPREADS:
        return None
    return (f"{column!r}: median {window_median:.4g}, spread {window_spread:.4g} against the reference's median {reference_median:.4g}, "
            f"spread {reference_spread:.4g} ({ratio:.3g}x the spread, {offset:.3g} spreads away)")  # fmt: skip


def units_refusal(problems: list[str], compared: int, names: tuple[str, str], note: str | None) -> str:
    """The paragraph refusing a window whose features ``problems`` (of ``compared``) are in other units."""
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return (f"{names[1]}: {len(problems)} of {compared} feature(s) are not in the units of {names[0]} (a spread {UNITS_FACTOR:g}x the reference's "
            f"or more, or a median {OFFSET_SPREADS:g} reference spreads away or more): {shown}. That is a change of units or a different kind of "
            f"data, not drift; nothing was compared. {note or 'Give the window in the units the reference was computed on.'}")  # fmt: skip
