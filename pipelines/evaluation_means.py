"""Validation and test means (losses) that are exact under DDP: one torchmetrics metric per logged name.

``self.log(name, loss, on_epoch=True, batch_size=n, sync_dist=True)`` weights the batches by their size within a
process, but ``sync_dist`` then takes the plain mean of the processes' epoch means. With
:class:`pipelines.data.UnpaddedDistributedSampler` the processes score different numbers of samples (207 images on
2 processes: 16 and 15 test images), so that mean was off the one-process value, and ``ModelCheckpoint`` and early
stopping monitor ``val/loss``. Here each name's metric sums ``value x weight`` and ``weight`` over the epoch's
batches; Lightning, given the metric object, computes it at the epoch's end from the sums of every process: the
mean over every sample scored, whatever each process's share.

The weight is what the batch's value is a mean over: its size for a per-sample mean, the sum of the class
weights of its targets for a class-weighted cross-entropy (whose epoch value is then that of the whole split,
however it is batched). The metrics' states are not persistent (not in ``state_dict``): checkpoints written
before or after load either way, strictly. A NaN value is kept: a diverged model's loss is NaN, never silently
dropped from the mean. (torchmetrics' ``MeanMetric`` drops NaNs by default, and with ``nan_strategy="disable"``
ignores the weights, torchmetrics#3434: :class:`WeightedMean` is the few lines needed.)

Example:
    >>> means = EvaluationMeans(["val/loss", "test/loss"])
    >>> metric = means.metric("val/loss")
    >>> metric.update(torch.tensor(1.0), 3); metric.update(torch.tensor(3.0), 1)
    >>> float(metric.compute()), len(means.state_dict())
    (1.5, 0)
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
import torch
from torchmetrics import Metric


def _key(name: str) -> str:
    return name.replace(".", "_")  # a module's name may not contain "."


class WeightedMean(Metric):
    """``sum(value x weight) / sum(weight)`` over the updates, summed over every process (NaN in, NaN out).

    Example:
        >>> mean = WeightedMean()
        >>> mean.update(torch.tensor(1.0), 3); mean.update(torch.tensor(3.0), 1)
        >>> float(mean.compute())
        1.5
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")  # not persistent (add_state's default)
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: float | torch.Tensor) -> None:
        weight = torch.as_tensor(weight, dtype=self.total.dtype, device=self.total.device)
        self.total += value.detach().to(self.total.dtype) * weight
        self.weight += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


class EvaluationMeans(torch.nn.ModuleDict):
    """A :class:`WeightedMean` per logged name (``"val/loss"``, ...), made when the task builds its metrics
    (``configure_metrics``): Lightning finds a logged metric among the task's modules."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        for name in names:
            if _key(name) in self:
                raise ValueError(f"EvaluationMeans: {name!r} is given twice (or as another name with '.' for '_')")
            self[_key(name)] = WeightedMean()

    def metric(self, name: str) -> WeightedMean:
        """The metric of ``name``."""
        return self[_key(name)]  # type: ignore[return-value]

    def log(self, task: pl.LightningModule, name: str, value: torch.Tensor, weight: float | torch.Tensor) -> None:
        """Add a batch's ``value`` (a mean over ``weight``) to ``name``'s epoch mean and log it (once per epoch)."""
        metric = self.metric(name)
        metric.update(value, weight.detach() if isinstance(weight, torch.Tensor) else weight)
        task.log(name, metric, on_step=False, on_epoch=True)
