"""Several optimizer steps per Lightning training step, with the numerics of one step per mini-batch.

Lightning's loop costs about 0.5 ms per training step whatever the model (hooks, profiler contexts,
the optimizer closure; benchmarks/RESULTS.md, issue 22 item 3): a third of a finance step. A task
with ``batches_per_step: K`` pays it once per K mini-batches: the training loader hands each step a
:class:`BatchGroup` of K consecutive mini-batches of the unchanged batch size
(:class:`GroupedBatchSampler`, :func:`grouped_loader`), and :func:`grouped_training_step` takes one
optimizer step per mini-batch through Lightning's public manual optimisation. What makes the
trajectory the one-batch-per-step loop's:

- the same mini-batches in the same order: the groups are the plain batch sampler's batches, put
  together (``limit_train_batches`` as a number of batches still counts mini-batches); the random
  draws of the data module's ``on_after_batch_transfer`` happen per mini-batch, just before its step
  (:meth:`BatchGroup.prepared_by`), as in the plain loop;
- the same optimizer calls (``zero_grad``, backward, ``step``) and scheduler steps: ``step``-interval
  schedulers after every optimizer step, ``epoch`` ones after the epoch's last mini-batch;
- ``trainer.global_step`` counts optimizer steps, so ``max_steps`` stops inside a group;
- a NaN or inf loss ends the group at that mini-batch (on a CPU, where reading it costs nothing), so
  the divergence guard stops the run at the same global step.

Where a trainer setting counts Lightning steps and would change meaning, or does not combine with
manual optimisation, the task trains one mini-batch per step as before (:func:`group_size` names
why, once): ``accumulate_grad_batches``, ``gradient_clip_val``, a fractional
``limit_train_batches``, a ``val_check_interval`` other than one epoch, a second checkpoint callback
(``--checkpoint_every_n_steps``), and Lightning's Tuner (``--lr_find``, ``--scale_batch_size``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from pipelines.data import make_loader
from pipelines.errors import InputError


@dataclasses.dataclass
class BatchGroup:
    """K consecutive mini-batches, collated together: ``rows`` holds their rows in order, each
    ``batch_size`` long but the epoch's last. Lightning moves it to the device as one batch;
    iterating gives the mini-batches back, each through ``prepare`` when set."""

    rows: Any
    batch_size: int
    prepare: Callable[[Any], Any] | None = None

    def __len__(self) -> int:
        return math.ceil(_rows(self.rows) / self.batch_size)

    def prepared_by(self, prepare: Callable[[Any], Any]) -> BatchGroup:
        """This group with ``prepare`` run on each mini-batch as it is taken (a data module's
        ``on_after_batch_transfer``: its random draws then come in the plain loop's order)."""
        return dataclasses.replace(self, prepare=prepare)

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, _rows(self.rows), self.batch_size):
            batch = _slice(self.rows, start, start + self.batch_size)
            yield self.prepare(batch) if self.prepare is not None else batch


def _rows(rows: Any) -> int:
    if isinstance(rows, dict):
        return _rows(next(iter(rows.values())))
    if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], torch.Tensor):
        return len(rows[0])
    return len(rows)


def _slice(rows: Any, start: int, stop: int) -> Any:
    if isinstance(rows, dict):
        return {key: _slice(value, start, stop) for key, value in rows.items()}
    if isinstance(rows, tuple) and rows and isinstance(rows[0], torch.Tensor):
        return tuple(value[start:stop] for value in rows)
    return rows[start:stop]


class GroupedBatchSampler(BatchSampler):
    """A ``BatchSampler`` that yields the indices of ``batches_per_group`` consecutive batches at
    once (the first ``max_batches`` batches of the epoch when given).

    Lightning re-creates it with a ``DistributedSampler`` under DDP (its arguments are recorded when
    it is built in a ``*_dataloader`` hook), so each rank groups its own share.

    Example:
        >>> list(GroupedBatchSampler(range(7), batch_size=2, drop_last=False, batches_per_group=3))
        [[0, 1, 2, 3, 4, 5], [6]]
        >>> len(GroupedBatchSampler(range(10), 2, False, batches_per_group=3, max_batches=4))
        2
    """

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool, batches_per_group: int = 1, max_batches: int | None = None) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.batches_per_group = batches_per_group
        self.max_batches = max_batches

    @property
    def batches(self) -> int:
        """Mini-batches per epoch (this rank's)."""
        batches = super().__len__()
        return batches if self.max_batches is None else min(batches, self.max_batches)

    def __len__(self) -> int:
        return math.ceil(self.batches / self.batches_per_group)

    def __iter__(self) -> Iterator[list[int]]:
        group: list[int] = []
        taken, limit = 0, self.batches
        for batch in super().__iter__():
            if taken == limit:
                break
            group.extend(batch)
            taken += 1
            if taken % self.batches_per_group == 0:
                yield group
                group = []
        if group:
            yield group


class _GroupCollate:
    """Wrap a collate function's output in a :class:`BatchGroup` (picklable for loader workers)."""

    def __init__(self, collate_fn: Callable[[Any], Any] | None, batch_size: int) -> None:
        from torch.utils.data import default_collate

        self.collate_fn = collate_fn or default_collate
        self.batch_size = batch_size

    def __call__(self, items: Any) -> BatchGroup:
        return BatchGroup(self.collate_fn(items), self.batch_size)


def grouped_loader(
    dataset: Dataset, batch_size: int, batches_per_group: int, num_workers: int | None = 0, pin_memory: bool | None = None,
    shuffle: bool = False, drop_last: bool = False, collate_fn: Callable[[Any], Any] | None = None, max_batches: int | None = None,
) -> DataLoader:
    """A training loader of :class:`BatchGroup` s: the batches ``make_loader(dataset, batch_size, shuffle=...,
    drop_last=...)`` gives, in its order (the same ``RandomSampler`` draw), ``batches_per_group`` at a time."""
    sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    batches = GroupedBatchSampler(sampler, batch_size, drop_last, batches_per_group, max_batches)
    return make_loader(dataset, 1, num_workers, pin_memory, batch_sampler=batches, collate_fn=_GroupCollate(collate_fn, batch_size))


def training_loader(
    trainer: Any, dataset: Dataset, batch_size: int, num_workers: int | None = 0, pin_memory: bool | None = None,
    drop_last: bool = False, collate_fn: Callable[[Any], Any] | None = None,
) -> DataLoader:
    """A data module's shuffled training loader: ``make_loader``'s, or, when the trainer's task trains
    several mini-batches per step (:func:`group_size`), the same batches grouped (:func:`grouped_loader`)."""
    groups = group_size(trainer.lightning_module) if trainer is not None and trainer.lightning_module is not None else 1
    kwargs = {"collate_fn": collate_fn} if collate_fn is not None else {}
    if groups == 1:
        return make_loader(dataset, batch_size, num_workers, pin_memory, shuffle=True, drop_last=drop_last, **kwargs)
    return grouped_loader(dataset, batch_size, groups, num_workers, pin_memory, True, drop_last, collate_fn, max_train_batches(trainer))


def check_batches_per_step(batches_per_step: int) -> None:
    """Refuse a ``--model.batches_per_step`` below 1.

    Example:
        >>> check_batches_per_step(0)
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: --model.batches_per_step 0: expected an integer >= 1 (mini-batches trained per Lightning step; 1 is one per step)
    """
    if isinstance(batches_per_step, bool) or not isinstance(batches_per_step, int) or batches_per_step < 1:
        raise InputError(f"--model.batches_per_step {batches_per_step}: expected an integer >= 1 (mini-batches trained per Lightning step; 1 is one per step)")


def group_size(module: Any) -> int:
    """The mini-batches per training step the task's ``batches_per_step`` gives under its trainer's
    settings: 1 (the plain loop) when a setting counts Lightning steps or needs automatic
    optimisation, with the reason said once; 1 without a trainer."""
    wanted = int(module.hparams.get("batches_per_step", 1) or 1)
    if wanted == 1:
        return 1
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer
        return 1
    if any(isinstance(callback, (LearningRateFinder, BatchSizeFinder)) for callback in trainer.callbacks):
        module.tuning = True  # until the Tuner's fit tears down: its callback swaps the trainer's callbacks while it runs
    why = TUNER if getattr(module, "tuning", False) else _plain_loop_reason(trainer)
    if why:
        if getattr(module, "_grouping_refused", None) != why:
            module._grouping_refused = why
            rank_zero_info(f"batches_per_step {wanted}: training one mini-batch per step instead, because {why}")
        return 1
    return wanted


def planned_group_size(batches_per_step: int, trainer_options: Any, checkpoint_every_n_steps: int | None = None) -> int:
    """What :func:`group_size` will give a fit whose Trainer is not built yet, from the runner's ``trainer`` options
    (``None`` for Lightning's defaults) and ``--checkpoint_every_n_steps``: for refusing a combination before the run
    folder exists (:func:`pipelines.row_shards.check_grouped_shards`).

    Example:
        >>> planned_group_size(8, {"accumulate_grad_batches": 2}), planned_group_size(8, {"limit_train_batches": 40}), planned_group_size(8, {}, 100)
        (1, 8, 1)
    """
    if batches_per_step == 1:
        return 1
    option = trainer_options.get
    checkpoints = 0 if option("enable_checkpointing") is False else 1 + (checkpoint_every_n_steps is not None)
    settings = types.SimpleNamespace(
        accumulate_grad_batches=option("accumulate_grad_batches") or 1, gradient_clip_val=option("gradient_clip_val"),
        limit_train_batches=1.0 if option("limit_train_batches") is None else option("limit_train_batches"),
        val_check_interval=1.0 if option("val_check_interval") is None else option("val_check_interval"), checkpoint_callbacks=[None] * checkpoints,
    )  # fmt: skip
    return 1 if _plain_loop_reason(settings) else batches_per_step


def _plain_loop_reason(trainer: Any) -> str:
    if trainer.accumulate_grad_batches != 1:
        return f"--trainer.accumulate_grad_batches {trainer.accumulate_grad_batches} needs Lightning's automatic optimisation"
    if trainer.gradient_clip_val:
        return f"--trainer.gradient_clip_val {trainer.gradient_clip_val} needs Lightning's automatic optimisation"
    if isinstance(trainer.limit_train_batches, float) and trainer.limit_train_batches != 1.0:
        return f"--trainer.limit_train_batches {trainer.limit_train_batches} (a fraction) would count steps of several mini-batches"
    if isinstance(trainer.val_check_interval, int) or trainer.val_check_interval != 1.0:  # an int counts batches
        return f"--trainer.val_check_interval {trainer.val_check_interval} would count steps of several mini-batches"
    if len(trainer.checkpoint_callbacks) > 1:
        return "a second checkpoint callback (--checkpoint_every_n_steps) would count steps of several mini-batches"
    return ""


TUNER = "Lightning's Tuner (--lr_find, --scale_batch_size) runs one mini-batch per step"


def max_train_batches(trainer: Any) -> int | None:
    """``--trainer.limit_train_batches`` as a number of mini-batches (``None``: every batch)."""
    limit = trainer.limit_train_batches if trainer is not None else None
    return limit if isinstance(limit, int) else None


class GroupedSteps:
    """Mixed into a task before :class:`~pipelines.task.BaseTask`: Lightning's ``automatic_optimization``
    is off exactly when the training loader hands out groups (:func:`group_size` > 1)."""

    groups_mini_batches = True  # BaseTask.log_train_loss writes train/loss_step to the loggers itself
    _automatic_for: tuple[Any, bool] | None = None  # (trainer key, automatic_optimization) last worked out
    tuning = False  # True from a Tuner's first look until its fit tears down (group_size)
    stepping_in_group = False  # True while _train_group takes a group's steps
    last_of_group = False  # True while it takes the group's last mini-batch

    @property
    def automatic_optimization(self) -> bool:  # Lightning reads it ~40 times per step: the answer is kept per trainer and callback list
        if not self._automatic_optimization:
            return False
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer
            trainer = None
        key = (id(trainer), self.tuning, len(trainer.callbacks) if trainer is not None else 0)
        if self._automatic_for is None or self._automatic_for[0] != key:
            self._automatic_for = (key, group_size(self) == 1)
        return self._automatic_for[1]

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self._automatic_optimization = value

    def setup(self, stage: str) -> None:
        if stage == "fit" and group_size(self) > 1:  # Lightning compares log_every_n_steps with its steps, groups here; the loss is logged per optimizer step
            warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
        super().setup(stage)  # type: ignore[misc]

    def teardown(self, stage: str) -> None:
        self.tuning = False
        super().teardown(stage)  # type: ignore[misc]


def grouped_training_step(step: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    """Decorate a task's one-mini-batch ``training_step`` (it returns the loss and logs it with
    ``log_train_loss``) so that a :class:`BatchGroup` is trained one optimizer step per mini-batch."""

    @functools.wraps(step)
    def training_step(self: Any, batch: Any, batch_idx: int) -> Any:
        if not isinstance(batch, BatchGroup):
            return step(self, batch, batch_idx)
        return _train_group(self, step, batch, batch_idx)

    return training_step


def _train_group(module: Any, step: Callable[..., torch.Tensor], group: BatchGroup, batch_idx: int) -> torch.Tensor | None:
    trainer = module.trainer
    optimizer = module.optimizers()
    configs = trainer.lr_scheduler_configs
    if isinstance(optimizer, list):
        raise ValueError(f"batches_per_step > 1 steps one optimizer; {type(module).__name__} has {len(optimizer)}: use batches_per_step 1")
    if any(config.reduce_on_plateau for config in configs):
        raise ValueError("batches_per_step > 1 cannot step a ReduceLROnPlateau scheduler (it reads validation metrics); use batches_per_step 1")
    first = batch_idx * group_size(module)  # the epoch's groups before this one were full
    module.stepping_in_group = True  # log_train_loss: train/loss_epoch at the group's last mini-batch (pipelines/task.py)
    try:
        return _steps(module, step, group, batch_idx, first, optimizer, configs)
    finally:
        module.stepping_in_group = False


def _steps(module: Any, step: Callable[..., torch.Tensor], group: BatchGroup, batch_idx: int, first: int, optimizer: Any, configs: list[Any]) -> torch.Tensor | None:
    trainer = module.trainer
    loss: torch.Tensor | None = None
    losses = []
    taken = 0
    size = len(group)
    # an epoch resumed mid-way restarts the loader and Lightning counts the groups done: its mini-batches end where the plain loop's do
    sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
    size = min(size, sampler.batches - first) if isinstance(sampler, GroupedBatchSampler) else size
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # zero_grad runs no hook: the torch optimizer's own, without the wrapper's lookups
    for offset, batch in enumerate(group):
        if offset == size or 0 < trainer.max_steps <= trainer.global_step:
            break
        module.last_of_group = offset == size - 1
        loss = step(module, batch, first + offset)
        torch_optimizer.zero_grad()
        module.manual_backward(loss)
        optimizer.step()
        taken += 1
        for config in configs:
            if config.interval == "step" and (first + offset + 1) % config.frequency == 0:
                config.scheduler.step()
        if loss.device.type == "cpu":  # reading it costs no synchronisation: stop the group where it diverged
            finite = math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss.detach()).all())
            if trainer.world_size > 1:  # every rank stops at the same mini-batch (DDP's backward is collective)
                finite = not trainer.strategy.reduce_boolean_decision(not finite, all=False)
            if not finite:
                return loss.detach()
        else:
            losses.append(loss.detach())
    if taken == size and (trainer.is_last_batch or batch_idx + 1 == trainer.num_training_batches):
        for config in configs:
            if config.interval == "epoch" and (trainer.current_epoch + 1) % config.frequency == 0:
                config.scheduler.step()
    if losses:  # on an accelerator: non-finite when any step's loss was (the guard reads it without a sync per step)
        return torch.stack(losses).sum()
    return None if loss is None else loss.detach()
