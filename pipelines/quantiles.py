"""Quantile (pinball) regression and the coverage of its intervals, for any task that predicts numbers.

A model trained with the pinball loss at levels ``q`` (e.g. ``[0.1, 0.5, 0.9]``) predicts, for
each target value, its ``q``-quantiles: the median is the point prediction and ``[q10, q90]`` an 80 %
central interval. Whether those intervals mean what they say is measured on held-out data:

- ``below_q10``: the share of true values below the predicted 10 % quantile (should be about 0.10);
- ``coverage_80``: the share of true values inside the central interval ``[q10, q90]`` (about 0.80),
  for every pair of levels symmetric about 0.5, pooled and optionally per horizon step.

An interval too narrow covers clearly less than its level, one too wide clearly more: the coverage
is a calibration check, not a score to maximise. :class:`QuantileCoverage` keeps sum and count
states (synchronised across processes under DDP).

Example:
    >>> levels = check_quantiles([0.1, 0.5, 0.9])
    >>> generator = torch.Generator().manual_seed(0)
    >>> truth = torch.randn(20000, generator=generator)
    >>> normal = torch.tensor([-1.2816, 0.0, 1.2816])  # the true quantiles of N(0, 1)
    >>> metric = QuantileCoverage(levels)
    >>> metric.update(normal.expand(20000, 3), truth)
    >>> round(metric.compute()["coverage_80"], 2), round(metric.compute()["below_q10"], 2)
    (0.8, 0.1)
    >>> narrow = QuantileCoverage(levels)
    >>> narrow.update(0.3 * normal.expand(20000, 3), truth)  # intervals 3.3 times too narrow
    >>> round(narrow.compute()["coverage_80"], 2)
    0.3
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import Metric

from pipelines.errors import InputError


def check_quantiles(quantiles: Any, option: str = "--model.quantiles") -> list[float]:
    """The quantile levels as floats, or :class:`InputError` naming ``option`` and what was expected:
    a non-empty list of distinct numbers strictly between 0 and 1, increasing, including 0.5 (the
    median is the point prediction)."""
    expected = "a list of increasing levels strictly between 0 and 1 that includes 0.5 (the median, the point prediction), e.g. [0.1, 0.5, 0.9]"
    if isinstance(quantiles, (str, bytes)) or not hasattr(quantiles, "__iter__"):
        raise InputError(f"{option} {quantiles!r}: expected {expected}")
    levels = list(quantiles)
    if not levels:
        raise InputError(f"{option} is empty: expected {expected}")
    for value in levels:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value < 1:
            raise InputError(f"{option} {levels}: {value!r} is not a level strictly between 0 and 1; expected {expected}")
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise InputError(f"{option} {levels}: the levels are not strictly increasing; expected {expected}")
    if not any(abs(v - 0.5) < 1e-9 for v in levels):
        raise InputError(f"{option} {levels}: 0.5 is missing; expected {expected}")
    return [float(v) for v in levels]


def median_index(quantiles: list[float]) -> int:
    """The position of 0.5 in ``quantiles`` (the point prediction)."""
    return min(range(len(quantiles)), key=lambda i: abs(quantiles[i] - 0.5))


def quantile_label(level: float) -> str:
    """``q10`` for 0.1, ``q2.5`` for 0.025: a column or metric name.

    Example:
        >>> [quantile_label(q) for q in (0.1, 0.5, 0.025, 0.975)]
        ['q10', 'q50', 'q2.5', 'q97.5']
    """
    return f"q{round(100 * level, 6):g}"


def central_intervals(quantiles: list[float]) -> list[tuple[int, int, float]]:
    """``(low index, high index, level)`` of every pair of levels symmetric about 0.5, widest first.

    Example:
        >>> central_intervals([0.05, 0.1, 0.5, 0.9, 0.95])
        [(0, 4, 0.9), (1, 3, 0.8)]
    """
    pairs = []
    for low, q in enumerate(quantiles):
        for high in range(len(quantiles) - 1, low, -1):
            if q < 0.5 and abs(quantiles[high] - (1 - q)) < 1e-9:
                pairs.append((low, high, round(quantiles[high] - q, 9)))
    return pairs


def interval_label(level: float) -> str:
    """``coverage_80`` for an 80 % central interval."""
    return f"coverage_{round(100 * level, 6):g}"


def pinball_loss(prediction: torch.Tensor, target: torch.Tensor, quantiles: torch.Tensor | list[float], dim: int = 1) -> torch.Tensor:
    """Mean pinball (quantile) loss of ``prediction`` (the levels along ``dim``) against ``target``
    (``prediction`` without that dimension): ``max(q (y - p), (q - 1) (y - p))``.

    Example:
        >>> round(pinball_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([2.0]), [0.1, 0.9]).item(), 4)  # (0.1 * 2 + 0.9 * 1) / 2
        0.55
    """
    levels = torch.as_tensor(quantiles, dtype=prediction.dtype, device=prediction.device)
    shape = [1] * prediction.ndim
    shape[dim] = -1
    error = target.unsqueeze(dim) - prediction
    levels = levels.view(shape)
    return torch.maximum(levels * error, (levels - 1) * error).mean()


class QuantileCoverage(Metric):
    """Shares of true values below each predicted quantile and inside each central interval.

    ``update(prediction, target)``: ``prediction`` ``(N, Q, *rest)`` (the levels along dim 1, sorted
    so that quantiles do not cross), ``target`` ``(N, *rest)``. With ``steps`` > 0, ``rest`` starts with
    a horizon axis of that length and the central intervals' coverage is also kept per step.
    ``compute()`` returns ``{"below_q10": .., "coverage_80": .., "coverage_80_step_1": ..}`` (steps 1-based).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, quantiles: list[float], steps: int = 0) -> None:
        super().__init__()
        self.quantiles = list(quantiles)
        self.pairs = central_intervals(self.quantiles)
        self.steps = steps
        self.add_state("below", default=torch.zeros(len(self.quantiles), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("inside", default=torch.zeros(len(self.pairs), max(steps, 1), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(max(steps, 1), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        prediction, target = prediction.detach(), target.detach()
        if self.steps:  # (N, Q, T, ...) -> (N * rest, Q, T)
            prediction = prediction.movedim(2, -1).reshape(prediction.shape[0], len(self.quantiles), -1, self.steps)
            prediction = prediction.permute(0, 2, 1, 3).reshape(-1, len(self.quantiles), self.steps)
            target = target.movedim(1, -1).reshape(-1, self.steps)
        else:
            prediction = prediction.reshape(prediction.shape[0], len(self.quantiles), -1).permute(0, 2, 1).reshape(-1, len(self.quantiles), 1)
            target = target.reshape(-1, 1)
        truth = target[:, None]
        self.below += (truth < prediction).double().sum((0, 2))
        for i, (low, high, _) in enumerate(self.pairs):
            self.inside[i] += ((target >= prediction[:, low]) & (target <= prediction[:, high])).double().sum(0)
        self.count += float(len(target))

    def compute(self) -> dict[str, float]:
        total = self.count.sum().clamp(min=1)
        values = {f"below_{quantile_label(q)}": float(self.below[i] / total) for i, q in enumerate(self.quantiles)}
        for i, (_, _, level) in enumerate(self.pairs):
            values[interval_label(level)] = float(self.inside[i].sum() / total)
            if self.steps:
                values |= {f"{interval_label(level)}_step_{t + 1}": float(self.inside[i, t] / self.count[t].clamp(min=1)) for t in range(self.steps)}
        return values
