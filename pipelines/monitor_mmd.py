"""A multivariate two-sample test for ``python -m pipelines.monitor``: kernel MMD with a permutation p-value.

Per-feature tests (PSI, KS) miss a change in how features go together; for images (the per-image
summary of :func:`pipelines.reference.image_summary`: intensity mean, spread and a 4 x 4 grid) a
reference keeps ``SAMPLE_ROWS`` whole rows (``sample``), and the window's rows are compared with them
by the maximum mean discrepancy (Gretton et al., 2012) with a Gaussian kernel: columns scaled by the
reference's standard deviation, bandwidth the median distance between the pooled rows, ``MMD^2``
unbiased; its p-value is the share of random relabellings of the pooled rows whose ``MMD^2`` is at
least the observed one (``permutations`` of them, seeded). Example::

    >>> rng = np.random.default_rng(0)
    >>> same = mmd_test(rng.normal(size=(200, 3)), rng.normal(size=(200, 3)))
    >>> moved = mmd_test(rng.normal(size=(200, 3)), rng.normal(size=(200, 3)) + 0.5)
    >>> same.pvalue > 0.05, moved.pvalue < 0.01
    (True, True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

MMD_ALPHA = 0.01
MAX_WINDOW_ROWS = 300


@dataclass(frozen=True)
class MMDResult:
    columns: int
    reference_rows: int
    window_rows: int
    mmd2: float
    pvalue: float
    permutations: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mmd2(kernel: np.ndarray, first: np.ndarray) -> float:
    """Unbiased ``MMD^2`` of the pooled kernel matrix split into ``first`` (a boolean mask) and the rest."""
    second = ~first
    a, b = kernel[np.ix_(first, first)], kernel[np.ix_(second, second)]
    n, m = int(first.sum()), int(second.sum())
    within_a = (a.sum() - np.trace(a)) / (n * (n - 1))
    within_b = (b.sum() - np.trace(b)) / (m * (m - 1))
    return float(within_a + within_b - 2 * kernel[np.ix_(first, second)].mean())


def mmd_test(reference: np.ndarray, window: np.ndarray, permutations: int = 500, seed: int = 0) -> MMDResult:
    """MMD of ``window`` rows against ``reference`` rows (same columns) and its permutation p-value."""
    rng = np.random.default_rng(seed)
    reference, window = np.asarray(reference, dtype=np.float64), np.asarray(window, dtype=np.float64)
    if len(window) > MAX_WINDOW_ROWS:
        window = window[np.sort(rng.choice(len(window), MAX_WINDOW_ROWS, replace=False))]
    scale = reference.std(axis=0)
    scale[scale == 0] = 1.0
    pooled = np.concatenate([reference, window]) / scale
    squared = np.square(pooled[:, None, :] - pooled[None, :, :]).sum(-1)
    bandwidth = np.median(squared[np.triu_indices(len(pooled), 1)]) or 1.0
    kernel = np.exp(-squared / bandwidth)
    first = np.arange(len(pooled)) < len(reference)
    observed = _mmd2(kernel, first)
    exceed = sum(_mmd2(kernel, rng.permutation(first)) >= observed for _ in range(permutations))
    return MMDResult(pooled.shape[1], len(reference), len(window), observed, (1 + exceed) / (1 + permutations), permutations)


def sample_test(stats: dict[str, Any] | None, window: pd.DataFrame) -> MMDResult | None:
    """The MMD test of the window's rows against the reference's ``sample`` (``None`` without one, or when the window lacks its columns)."""
    sample = (stats or {}).get("sample")
    if not sample or not set(sample["columns"]) <= set(window.columns):
        return None
    rows = window[sample["columns"]].apply(pd.to_numeric, errors="coerce").dropna().to_numpy(dtype=np.float64)
    if len(rows) < 10:
        return None
    return mmd_test(np.asarray(sample["rows"], dtype=np.float64), rows)
