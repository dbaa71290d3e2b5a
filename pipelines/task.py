"""The shape every domain's LightningModule takes (after torchgeo's ``BaseTask``).

``__init__`` saves the hyper-parameters and calls ``configure_models``, ``configure_losses`` and
``configure_metrics``; optimisation is shared here. Networks themselves live in each domain's
``networks.py`` as plain ``nn.Module`` s, free of Lightning, because that is what gets exported.

Example:
    >>> class Regressor(BaseTask):
    ...     def __init__(self, lr: float = 1e-3) -> None:
    ...         super().__init__()
    ...     def configure_models(self) -> None:
    ...         self.net = torch.nn.Linear(3, 1)
    >>> Regressor(lr=0.01).hparams.lr
    0.01
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch

from pipelines.export_spec import ExportSpec


def compile_networks(model: torch.nn.Module) -> list[str]:
    """``torch.compile`` each network a task holds, in place, and return their names.

    The networks are the task's direct children that have parameters and are not metrics (members
    of a ``ModuleDict``/``ModuleList`` count one by one). Only they are compiled, not the
    LightningModule: its steps log and update metrics, which would recompile at every step, and
    in-place compilation (``nn.Module.compile``) keeps the checkpoint's keys unchanged. Under
    :func:`eager_fallback` a graph that fails to compile runs eagerly instead of failing the run. Only a network's forward call is
    compiled, and Dynamo skips torch's own modules used bare as a network (an ``nn.Sequential`` or
    ``nn.Linear``; pytorch#150915): networks are their own classes, as in every domain's ``networks.py``.

    Example:
        >>> class Scaler(torch.nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.ones(4))
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return x * self.weight
        >>> class Task(BaseTask):
        ...     def configure_models(self) -> None:
        ...         self.encoder, self.decoder = Scaler(), Scaler()
        >>> compile_networks(Task())
        ['encoder', 'decoder']
    """
    from torchmetrics import Metric, MetricCollection

    compiled = []
    for name, child in model.named_children():
        members = child.named_children() if isinstance(child, (torch.nn.ModuleDict, torch.nn.ModuleList)) else [("", child)]
        for member, module in members:
            if isinstance(module, (Metric, MetricCollection)) or next(module.parameters(), None) is None:
                continue
            module.compile()
            compiled.append(f"{name}.{member}" if member else name)
    return compiled


@contextlib.contextmanager
def eager_fallback() -> Iterator[None]:
    """While open, a graph that ``torch.compile`` fails to compile runs eagerly instead of raising.

    Compilation happens at a network's first call, so the runner holds this open for the whole
    command (``--compile``); torch's setting is restored when it closes."""
    import torch._dynamo

    with torch._dynamo.config.patch(suppress_errors=True):
        yield


class BaseTask(pl.LightningModule):
    """Base LightningModule: subclasses fill the ``configure_*`` slots and the step methods.

    Optimisation reads ``lr``, ``weight_decay`` and ``lr_schedule`` (``"cosine"``, ``"step"``,
    ``"constant"``) from the subclass's hyper-parameters when present. A ``cpu_threads``
    hyper-parameter limits torch's intra-op threads while the model runs on a CPU (small networks
    run faster on one thread than on several contended ones) and is restored afterwards; subclasses
    that override ``setup``/``teardown`` call ``super()``.
    """

    #: ``__init__`` arguments kept out of the saved hyper-parameters (e.g. large objects).
    hparams_ignore: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._saved_threads: int | None = None
        #: bootstrap intervals of the test metrics, set by a task at the end of ``test`` (pipelines/bootstrap.py)
        self.metric_intervals: dict[str, dict[str, Any]] = {}
        self._loss_sum: torch.Tensor | None = None  # the epoch's training loss so far (log_train_loss)
        self._loss_samples = 0
        self._epoch_of_loss_sum: int | None = None
        self._loss_sum_step = 0  # the global step of the last loss summed
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    def setup(self, stage: str) -> None:
        threads = self.hparams.get("cpu_threads")
        on_cpu = self.device.type == "cpu"  # Lightning sets the device the model will run on before setup
        if threads and on_cpu and self._saved_threads is None:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(int(threads))

    def teardown(self, stage: str) -> None:
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def configure_models(self) -> None:
        """Build the networks (from ``networks.py``)."""

    def configure_losses(self) -> None:
        """Build the loss functions."""

    def configure_metrics(self) -> None:
        """Build torchmetrics collections, one clone per stage."""

    def log_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """Log the training loss: ``train/loss_step`` on the steps Lightning writes to the loggers (every
        ``trainer.log_every_n_steps``; every step of a manually optimised model) and ``train/loss_epoch``,
        the mean over the epoch's samples, at its last batch. Within a group of mini-batches
        (``batches_per_step``, :mod:`pipelines.grouped_steps`) ``train/loss_step`` goes to the loggers
        directly (for such a task also when it takes one per step), at the optimizer steps and with the
        step numbers of the one-batch-per-step loop.

        Between those steps the loss only joins a running sum on its device (no ``self.log``, which
        costs ~0.4 ms per call on a CPU, a third of a finance step, and no host synchronisation). The
        value is this process's own: under DDP no ``all_reduce`` runs per step (averaging the step
        loss across ranks cost finance and autonomous 14-17 % of their throughput on 2-process DDP,
        benchmarks/RESULTS.md), so ``train/loss_epoch`` is rank zero's shard mean, an unbiased
        estimate of the global one. Validation and test metrics are computed over every rank.
        """
        try:
            trainer = self.trainer
        except RuntimeError:  # no Trainer (a hand-written loop): nothing to log to
            return
        step = trainer.global_step  # (a chain of properties: read once)
        # a new epoch, a resumed one or a new fit (after --lr_find's range test, whose steps are undone): a new mean
        if self._epoch_of_loss_sum != trainer.current_epoch or step < self._loss_sum_step:
            self._loss_sum, self._loss_samples, self._epoch_of_loss_sum = torch.zeros_like(loss.detach()), 0, trainer.current_epoch
        self._loss_sum_step = step
        self._loss_sum.add_(loss.detach() * batch_size)  # in place: the sum's values as before, without a new tensor per step
        self._loss_samples += batch_size
        every = trainer.log_every_n_steps
        due = every > 0 and (step + 1) % every == 0
        if getattr(self, "groups_mini_batches", False):  # a task of pipelines/grouped_steps.py: several optimizer steps per Lightning step
            if due:  # to the loggers as Lightning writes it one batch per step (at its step, with the epoch); the rest as usual
                metrics = {"train/loss_step": float(loss.detach()), "epoch": trainer.current_epoch}
                for logger in self.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)
                    logger.save()
                self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=batch_size, sync_dist=False)
        elif not self.automatic_optimization or due:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size, sync_dist=False)
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= step + 1
        last_batch = trainer.is_last_batch and (not getattr(self, "stepping_in_group", False) or self.last_of_group)
        if last_batch or last_step:
            mean = self._loss_sum / self._loss_samples
            self.log("train/loss_epoch", mean, on_step=False, on_epoch=True, prog_bar=True, batch_size=self._loss_samples, sync_dist=False)

    def export_spec(self, datamodule_state: dict[str, Any] | None) -> ExportSpec:
        """The inference module with pre/post-processing, for ``pipelines.run DOMAIN export``.

        Args:
            datamodule_state: what the domain's data module saved in the checkpoint (fitted scalers,
                encoders, class names), or ``None`` when the checkpoint has none.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement export_spec()")

    def configure_optimizers(self) -> Any:
        lr = float(self.hparams.get("lr", 1e-3))
        optimizer = torch.optim.AdamW(
            (p for p in self.parameters() if p.requires_grad), lr=lr, weight_decay=float(self.hparams.get("weight_decay", 0.0))
        )
        schedule = self.hparams.get("lr_schedule", "cosine")
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        if schedule == "constant" or epochs is None:
            return optimizer
        if schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        elif schedule == "step":  # the MedMNIST recipe: x0.1 at 50 % and 75 % of training
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(epochs * 0.5), int(epochs * 0.75)], 0.1)
        else:
            raise ValueError(f"lr_schedule must be 'cosine', 'step' or 'constant', got {schedule!r}")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
