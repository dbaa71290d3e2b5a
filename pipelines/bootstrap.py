"""Bootstrap confidence intervals for test metrics, seeded (the same run gives the same interval).

A test set of 156 images moves accuracy by one image per 0.006: a number without its interval
invites reading noise as progress. :func:`bootstrap_intervals` resamples the test rows with
replacement, recomputes every metric on each resample and reports the percentile interval.

:func:`bootstrap_count_intervals` does the same for metrics written over row counts
(:mod:`pipelines.weighted_metrics`): a batch of resamples is a ``(b, rows)`` count matrix and
every metric an array over it, so 1000 resamples cost a few array operations instead of 1000
torchmetrics calls per metric. The test metrics of every domain go this way.

Tasks compute their per-row outputs at the end of ``test`` and set ``metric_intervals`` on
themselves (either function's result); :class:`pipelines.tracking.RunSummary` writes it to
``summary.json`` as ``test_intervals``, beside ``test``.

Example:
    >>> import numpy as np
    >>> correct = np.array([1.0] * 80 + [0.0] * 20)
    >>> interval = bootstrap_intervals(len(correct), lambda rows: {"test/accuracy": correct[rows].mean()})["test/accuracy"]
    >>> interval["low"] < 0.8 < interval["high"], interval["resamples"]
    (True, 1000)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
#: count-matrix elements per batch of resamples (about 32 MB as int64)
CHUNK_ELEMENTS = 4_000_000


def _float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        value = value.detach().double().cpu().item()
    return float(value)


def bootstrap_intervals(
    rows: int, metrics: Callable[[np.ndarray], dict[str, Any]], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED
) -> dict[str, dict[str, Any]]:
    """Percentile bootstrap intervals of every metric ``metrics(row_indices)`` returns.

    Args:
        rows: number of test rows.
        metrics: maps an array of row indices (with repeats) to ``{name: value}``; a value that cannot
            be computed on a resample (e.g. AUROC with one class drawn) may be NaN or absent: such
            resamples are left out for that metric. One call per resample: for metrics that can be
            written over row counts, :func:`bootstrap_count_intervals` is much faster (same resamples).
        resamples: bootstrap resamples.
        level: coverage of the interval (0.95: the 2.5th and 97.5th percentiles).
        seed: the resampling seed (numpy ``default_rng``).

    Returns ``{name: {"low", "high", "level", "resamples" (those that gave a finite value), "method"}}``;
    a metric with fewer than half of its resamples finite gets no interval (``low``/``high`` None).
    """
    every_row = np.arange(rows)

    def one_at_a_time(counts: np.ndarray) -> dict[str, np.ndarray]:  # the same seeded resamples as the count form
        found = [{name: _float(v) for name, v in metrics(np.repeat(every_row, drawn.astype(np.int64))).items()} for drawn in counts]
        names = {name for values in found for name in values}
        return {name: np.array([values.get(name, np.nan) for values in found]) for name in names}  # absent: NaN, left out

    return bootstrap_count_intervals(rows, one_at_a_time, resamples, level, seed)


def resample_counts(rows: int, resamples: int = RESAMPLES, seed: int = SEED, chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``rows`` rows as count matrices ``(b, rows)`` (how often each row was
    drawn), in batches of at most ``chunk_elements`` counts; seeded."""
    generator = np.random.default_rng(seed)
    per_batch = max(1, min(resamples, chunk_elements // max(rows, 1)))
    for start in range(0, resamples, per_batch):
        batch = min(per_batch, resamples - start)
        drawn = generator.integers(0, rows, (batch, rows)) + (np.arange(batch) * rows)[:, None]
        yield np.bincount(drawn.ravel(), minlength=batch * rows).reshape(batch, rows)


def bootstrap_count_intervals(
    rows: int, metrics: Callable[[np.ndarray], dict[str, np.ndarray]], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED
) -> dict[str, dict[str, Any]]:
    """Percentile bootstrap intervals of metrics computed for a batch of resamples at once.

    ``metrics`` maps a count matrix ``(b, rows)`` (:func:`resample_counts`) to ``{name: array of b
    values}`` (NaN where a resample cannot give one); otherwise as :func:`bootstrap_intervals`.

    Example:
        >>> correct = np.array([1.0] * 80 + [0.0] * 20)
        >>> interval = bootstrap_count_intervals(len(correct), lambda counts: {"test/accuracy": counts @ correct / len(correct)})["test/accuracy"]
        >>> interval["low"] < 0.8 < interval["high"], interval["resamples"]
        (True, 1000)
    """
    if rows < 2:
        return {}
    values: dict[str, list[np.ndarray]] = {}
    for counts in resample_counts(rows, resamples, seed):
        counts = counts.astype(np.float64)  # once per batch: every weighted sum over it is a float matrix product
        for name, value in metrics(counts).items():
            values.setdefault(name, []).append(np.asarray(value, dtype=np.float64).reshape(len(counts)))
    return _percentile_intervals({name: np.concatenate(parts) for name, parts in values.items()}, rows, resamples, level, seed)


def _percentile_intervals(values: dict[str, np.ndarray], rows: int, resamples: int, level: float, seed: int) -> dict[str, dict[str, Any]]:
    tail = (1 - level) / 2
    intervals = {}
    for name, samples in values.items():
        finite = samples[np.isfinite(samples)]
        enough = len(finite) >= resamples / 2
        low, high = (float(np.quantile(finite, tail)), float(np.quantile(finite, 1 - tail))) if enough else (None, None)
        intervals[name] = {"low": low, "high": high, "level": level, "resamples": int(len(finite)), "method": f"percentile bootstrap over {rows} test rows, seed {seed}"}
    return intervals


def format_interval(value: float | None, interval: dict[str, Any] | None) -> str:
    """``0.912 (95% CI 0.871-0.944)``, or the value alone when there is no interval."""
    if value is None or not isinstance(value, (int, float)):
        return str(value)
    text = f"{value:.4g}"
    if interval and interval.get("low") is not None:
        text += f" ({interval['level']:.0%} CI {interval['low']:.3g} to {interval['high']:.3g})"
    return text
