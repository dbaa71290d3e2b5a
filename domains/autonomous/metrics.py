"""Trajectory metrics as ``torchmetrics.Metric`` classes (sum and count states: DDP-synchronised).

ADE is the mean Euclidean distance over the predicted steps, FDE the distance at the last step,
both in the data's units (metres for ETH/UCY). Given K predicted futures, the best one per window
counts (min-of-K, "best of K" as in Social GAN and Social-STGCNN); with K = 1 it is the plain
single-prediction error.

Example:
    >>> metric = DisplacementError(final=False)
    >>> metric.update(torch.zeros(2, 3, 4, 2), torch.ones(2, 4, 2))
    >>> round(float(metric.compute()), 4)
    1.4142
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class DisplacementError(Metric):
    """Min-over-K average (``final=False``) or final (``final=True``) displacement error.

    ``update(pred, target)``: ``pred`` ``(B, K, T, D)`` or ``(B, T, D)``, ``target`` ``(B, T, D)``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, final: bool = False) -> None:
        super().__init__()
        self.final = final
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.ndim == target.ndim:
            pred = pred[:, None]
        distance = (pred - target[:, None]).norm(dim=-1)  # (B, K, T)
        error = distance[..., -1] if self.final else distance.mean(-1)
        self.total += error.min(1).values.double().sum()
        self.count += len(target)

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class VectorMean(Metric):
    """Mean of per-row vectors ``(B, size)`` over every row seen (sum and count states: DDP-synchronised);
    the test's mean channel attributions (:mod:`domains.autonomous.attributions`) and the base of
    :class:`StepDisplacementError`."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, rows: torch.Tensor) -> None:
        self.total += rows.detach().double().sum(0)
        self.count += float(len(rows))

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class StepDisplacementError(VectorMean):
    """Mean displacement error at each horizon step: ``compute()`` is ``(steps,)``; its last value is the FDE.

    ``update(pred, target)``: ``pred`` and ``target`` ``(B, steps, D)`` (single predictions).

    Example:
        >>> metric = StepDisplacementError(steps=3)
        >>> metric.update(torch.tensor([[[0.0], [1.0], [3.0]]]), torch.zeros(1, 3, 1))
        >>> metric.compute().tolist()
        [0.0, 1.0, 3.0]
    """

    higher_is_better = False

    def __init__(self, steps: int) -> None:
        super().__init__(steps)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update((pred - target).norm(dim=-1))
