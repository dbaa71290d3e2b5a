"""Drift statistics per numeric feature between a reference table and a window: PSI and two-sample KS.

- PSI (population stability index): the reference's deciles (``bins`` quantile bins, the outer
  ones open-ended) applied to both samples; ``sum((w - r) * ln(w / r))`` over the bins' shares,
  empty bins counted as ``EPSILON``. Rule of thumb: < 0.1 stable, 0.1-0.2 moderate, > 0.2 major.
- KS: ``scipy.stats.ks_2samp`` (statistic: the largest gap between the two empirical CDFs, and its p-value).

A feature drifts when its PSI is at least ``psi_threshold`` and more than sampling noise, or its
KS p-value is below ``ks_alpha`` divided by the number of features compared (Bonferroni: on data
that did not move, the chance that any feature is flagged by KS stays below ``ks_alpha``, however
many features there are). "More than sampling noise": the G-test of homogeneity on the two
samples' counts in PSI's bins (``psi_pvalue``) must also be below that per-feature alpha. On large windows this changes nothing (any PSI of 0.2 is significant); on a window of a few
dozen rows a calm sample's PSI is often above 0.2 by chance alone and is no longer called drift. Missing values (NaN, an empty CSV cell) are left out of both statistics and counted;
a value that is not a number, or +-inf, is refused naming the table, column and rows. Example::

    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> reference = pd.DataFrame({"amount": rng.normal(size=2000)})
    >>> [r.drifted for r in compare(reference, pd.DataFrame({"amount": rng.normal(size=2000) + 0.3}))]
    [True]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipelines.errors import InputError, did_you_mean
from pipelines.validation import describe_rows

EPSILON = 1e-4
PSI_THRESHOLD = 0.2
KS_ALPHA = 0.001


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    ks_statistic: float
    ks_pvalue: float
    psi_pvalue: float
    reference_count: int
    window_count: int
    reference_missing: int
    window_missing: int
    drifted: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bin_counts(reference: np.ndarray, window: np.ndarray, bins: int = 10) -> np.ndarray:
    """The counts of both samples (rows: reference, window) in the reference's quantile bins (the outer ones open-ended)."""
    reference, window = np.asarray(reference, dtype=float), np.asarray(window, dtype=float)
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.stack([np.bincount(np.searchsorted(edges, sample, side="right"), minlength=len(edges) + 1) for sample in (reference, window)])


def psi_of_counts(counts: np.ndarray) -> float:
    """Population stability index of the window row of :func:`bin_counts` against its reference row."""
    ref, win = (np.maximum(row / row.sum(), EPSILON) for row in counts)
    return float(np.sum((win - ref) * np.log(win / ref)))


def psi(reference: np.ndarray, window: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``window`` against ``reference`` on the reference's quantile bins."""
    return psi_of_counts(bin_counts(reference, window, bins))


def psi_pvalue(counts: np.ndarray) -> float:
    """How likely bin shares as far apart as these are between two samples of one distribution: the
    G-test of homogeneity (``scipy.stats.chi2_contingency``, log-likelihood) on :func:`bin_counts`.
    PSI counts an empty bin as a share of ``EPSILON``, which makes it large on a small window; the
    counts do not.

    >>> rng = np.random.default_rng(0)
    >>> counts = bin_counts(rng.normal(size=5000), rng.normal(size=30))
    >>> psi_of_counts(counts) > 0.2, psi_pvalue(counts) > 0.001  # big PSI, small window: noise
    (True, True)
    """
    from scipy.stats import chi2_contingency

    counts = counts[:, counts.sum(axis=0) > 0]
    if counts.shape[1] < 2:
        return 1.0  # every value in one bin on both sides: nothing to tell apart
    return float(chi2_contingency(counts, lambda_="log-likelihood").pvalue)


def numeric_columns(frame: pd.DataFrame) -> list[str]:
    """The columns holding numbers (booleans excluded)."""
    return [str(c) for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]


def _check_numbers(frame: pd.DataFrame, column: str, name: str) -> None:
    """Refuse a column of ``frame`` that is absent, not numeric (naming the first row that is not a
    number, 1-based, the header not counted) or holds +-inf (a missing value is NaN / an empty cell)."""
    if column not in frame.columns:
        raise InputError(f"{name}: column {column!r} is missing{did_you_mean(column, map(str, frame.columns))}; its columns are {list(map(str, frame.columns))}")
    values = frame[column]
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        numbers = pd.to_numeric(values, errors="coerce") if not pd.api.types.is_bool_dtype(values) else pd.Series(np.nan, index=values.index)
        bad = np.flatnonzero(numbers.isna().to_numpy() & values.notna().to_numpy())
        example = f": {describe_rows(bad + 1)} hold{'s' if len(bad) == 1 else ''} {values.iloc[bad[0]]!r}" if len(bad) else ""
        raise InputError(f"{name}: column {column!r} should hold numbers (a missing value is an empty cell) but has dtype {values.dtype}{example}")
    infinite = np.flatnonzero(np.isinf(values.to_numpy(dtype=float)))
    if len(infinite):
        raise InputError(f"{name}: column {column!r} holds inf at {describe_rows(infinite + 1)}; expected finite numbers (a missing value is an empty cell or NaN)")


def compare(
    reference: pd.DataFrame, window: pd.DataFrame, columns: list[str] | None = None, psi_threshold: float = PSI_THRESHOLD,
    ks_alpha: float = KS_ALPHA, bins: int = 10, names: tuple[str, str] = ("the reference", "the window"), units_note: str | None = None,
) -> list[FeatureDrift]:
    """PSI and KS per feature (default: every numeric column of the reference).

    Raises :class:`pipelines.errors.InputError` (a ``ValueError``) naming the table (``names``: e.g.
    the files), the column and the rows: columns missing from the window (all of them named), a value
    that is not a number, +-inf, fewer than 2 values left once missing values (NaN) are left out, or
    a window in other units than the reference (:mod:`pipelines.drift_units`; ``units_note`` says
    what the reference's units are, e.g. a model's preprocessed input).
    """
    from scipy.stats import ks_2samp

    from pipelines.drift_units import units_mismatch, units_refusal

    columns = numeric_columns(reference) if columns is None else columns
    if not columns:
        raise InputError(f"{names[0]}: no numeric columns to compare; its columns are {list(map(str, reference.columns))} (name them with --columns)")
    absent = [c for c in columns if c in reference.columns and c not in window.columns]
    if len(absent) > 1:
        shown = ", ".join(map(repr, absent[:8])) + (f" and {len(absent) - 8} more" if len(absent) > 8 else "")
        raise InputError(f"{names[1]}: {len(absent)} of the {len(columns)} features of {names[0]} are missing: {shown}; its columns are "
                         f"{list(map(str, window.columns))[:20]}. {units_note or ''}".strip())  # fmt: skip
    samples, problems = [], []
    for column in columns:
        for name, frame in zip(names, (reference, window)):
            _check_numbers(frame, column, name)
        ref, win = (frame[column].to_numpy(dtype=float) for frame in (reference, window))
        ref_ok, win_ok = ref[np.isfinite(ref)], win[np.isfinite(win)]
        for name, values, kept in zip(names, (ref, win), (ref_ok, win_ok)):
            if len(kept) < 2:
                raise InputError(
                    f"{name}: column {column!r} has {len(kept)} value(s) once the {len(values) - len(kept)} missing one(s) are left out "
                    f"({len(values)} rows); expected at least 2 numbers"
                )
        samples.append((column, ref, win, ref_ok, win_ok))
        problems += [problem] if (problem := units_mismatch(column, ref_ok, win_ok)) else []
    if problems:
        raise InputError(units_refusal(problems, len(columns), names, units_note))
    results = []
    per_feature_alpha = ks_alpha / len(columns)
    for column, ref, win, ref_ok, win_ok in samples:
        counts = bin_counts(ref_ok, win_ok, bins)  # binned once for both the PSI and its noise test
        value, value_p = psi_of_counts(counts), psi_pvalue(counts)
        ks = ks_2samp(ref_ok, win_ok)
        results.append(FeatureDrift(
            feature=column, psi=value, ks_statistic=float(ks.statistic), ks_pvalue=float(ks.pvalue), psi_pvalue=value_p,
            reference_count=len(ref_ok), window_count=len(win_ok),
            reference_missing=len(ref) - len(ref_ok), window_missing=len(win) - len(win_ok),
            drifted=bool((value >= psi_threshold and value_p < per_feature_alpha) or ks.pvalue < per_feature_alpha),
        ))  # fmt: skip
    return results
