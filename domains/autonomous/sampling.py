"""The sampling-rate rules of a sensor table: one time step for the whole data set.

A model that reads per-step displacements learns them at one sampling rate: a track sampled at
another rate (or with its time column in another unit: milliseconds among seconds) would be read as
moving 10x or 1000x too fast or too slow, and unevenly sampled tracks give displacements that mean
different things at each step. The rules, checked on every split and on the ``predict`` file:

- **The step**: ``data.time_step`` when declared, else the *median* step between consecutive rows
  of the same track over *all training tracks together* (:func:`infer_time_step`). The training
  split's step is used for val, test and predict files, and saved in every checkpoint.
- **Jitter**: a step within ``time_jitter`` (a fraction, default 0.1 = 10 %) of the time step is a
  regular step.
- **Gaps**: a step longer than ``max_gap`` time steps (default 1.9: at least one missing sample,
  less the jitter) is a gap: the track is split there into gap-free segments (windows never span a
  gap). Rows dropped by the NaN rule leave gaps too.
- **Refused** (:class:`pipelines.errors.InputError`, naming the file, the track and its rows, the step
  found and the step expected): a track whose median step is not a regular step (another rate or
  another time unit: it would otherwise be cut into one-row pieces and silently dropped), and any
  step that is neither regular nor a gap (shorter than ``(1 - time_jitter)`` steps, or between
  ``1 + time_jitter`` and ``max_gap`` steps).

Example:
    >>> infer_time_step(np.array([0.1, 0.1, 0.1, 0.35, 0.1]))
    0.1
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from pipelines.errors import InputError

#: Relative slack on the tolerance bounds, so that float time columns (0.1 * k) sit inside them.
EPS = 1e-6


def infer_time_step(steps: np.ndarray) -> float | None:
    """The median of the (positive) steps between consecutive rows of a track, over all tracks;
    ``None`` when there is no step (every track has one row)."""
    steps = np.asarray(steps, dtype=np.float64)
    return float(np.median(steps)) if len(steps) else None


def check_time_options(time_step: float | None, time_jitter: float, max_gap: float) -> None:
    """Refuse a declared step that is not a positive number, a jitter outside [0, 0.5) and a
    ``max_gap`` that a regular step could exceed."""
    if time_step is not None and not (np.isfinite(time_step) and time_step > 0):
        raise InputError(f"--data.time_step must be a positive number (the sampling step in the time column's units), got {time_step}")
    if not (0 <= time_jitter < 0.5):
        raise InputError(f"--data.time_jitter must be in [0, 0.5) (a fraction of the time step), got {time_jitter}")
    if not max_gap > 1 + time_jitter:
        raise InputError(f"--data.max_gap ({max_gap:g} time steps) must exceed 1 + --data.time_jitter ({1 + time_jitter:g}): a regular step would count as a gap")


def check_sampling(
    time: np.ndarray,
    codes: np.ndarray,
    names: list[str] | pd.Index,
    time_step: float,
    time_jitter: float,
    max_gap: float,
    locate: Callable[[int], tuple[str, int]],
    split_name: str,
) -> None:
    """Refuse tracks at another rate and irregular steps (see the module's rules).

    Args:
        time: times grouped by track and sorted within each (strictly increasing inside a track).
        codes: the track code of each row (equal codes are contiguous).
        names: track names by code.
        time_step, time_jitter, max_gap: the rules' parameters.
        locate: ``position -> (file, 1-based data row)`` of a row of ``time``.
        split_name: the split, for the message.
    """
    same = codes[1:] == codes[:-1]
    step = np.diff(time)
    low, high = (1 - time_jitter) * time_step * (1 - EPS), (1 + time_jitter) * time_step * (1 + EPS)
    regular = (step >= low) & (step <= high)
    gap = step > max_gap * time_step * (1 + EPS)
    expected = f"expected {time_step:g} +- {time_jitter:.0%} (--data.time_jitter)"
    step_from = "--data.time_step" if split_name == "train" else "the training data's step, saved in the checkpoint"
    inside = np.flatnonzero(same)
    if len(inside):
        medians = pd.Series(step[inside]).groupby(codes[inside + 1]).median()
        off = medians[~((medians >= low) & (medians <= high))]
        if len(off):
            code, median = int(off.index[0]), float(off.iloc[0])
            rows = np.flatnonzero(codes == code)
            (file, first), (_, last) = locate(rows[0]), locate(rows[-1])
            raise InputError(
                f"{file}: track {str(names[code])!r} (rows {first} to {last}, {split_name} split) is sampled every {median:g} "
                f"(its median step over {len(rows) - 1} steps) but the data set's time step is {time_step:g}: {expected}. "
                f"{len(off)} track(s) are at another rate or in another time unit (e.g. milliseconds among seconds): resample or convert "
                f"them; the data set's step is {step_from} (default: the median step of all training tracks)"
            )
    bad = np.flatnonzero(same & ~regular & ~gap)
    if len(bad):
        first = bad[0]
        (file, row_a), (_, row_b) = locate(first), locate(first + 1)
        where = sorted({locate(i + 1)[1] for i in bad[:5]})
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InputError(
            f"{file}: track {str(names[codes[first]])!r} ({split_name} split) steps from time {time[first]:g} (row {row_a}) to {time[first + 1]:g} "
            f"(row {row_b}), a step of {step[first]:g}: {expected}, or a gap of more than --data.max_gap = {max_gap:g} steps "
            f"(> {max_gap * time_step:g}) where the track is split. {len(bad)} irregular step(s) in {len(np.unique(codes[bad]))} track(s), "
            f"ending at rows {', '.join(str(r) for r in where)}{more}: resample the data, or raise --data.time_jitter if the jitter is harmless"
        )


def gap_mask(time: np.ndarray, codes: np.ndarray, time_step: float, max_gap: float) -> np.ndarray:
    """``True`` between consecutive rows of one track that are more than ``max_gap`` steps apart."""
    return (codes[1:] == codes[:-1]) & (np.diff(time) > max_gap * time_step * (1 + EPS))
