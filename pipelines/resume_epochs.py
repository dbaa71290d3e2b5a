"""A resumed ``fit`` must have epochs and steps left to train: ``--trainer.max_epochs`` or ``--trainer.max_steps`` below
what the checkpoint has done is refused.

Lightning's fit loop stops as soon as the epochs it has processed reach ``max_epochs``. Resumed from a checkpoint
that has done more epochs than ``--trainer.max_epochs`` (``fit --ckpt_path last --trainer.max_epochs 1`` on a run of
2 epochs), it trained nothing and returned 0, after rewriting the run's ``config.yaml`` with the smaller value (or,
further below, crashed with exit 1). :func:`check_epochs_left` refuses it while the command is parsed, before
anything is written, naming both numbers. A checkpoint saved part-way through an epoch (``--checkpoint_every_n_steps``)
counts that epoch as begun: a ``max_epochs`` that would leave it unfinished trains nothing either and is refused too.
``max_epochs`` equal to the epochs a checkpoint saved at an epoch's end has done is accepted (a finished run
resumed, e.g. a requeued job: nothing is left to train, which is said).

``--trainer.max_steps`` likewise: Lightning stops as soon as its global step (optimizer steps, those of the fit loop's
state) reaches ``max_steps``, so a resume whose ``max_steps`` is below the checkpoint's global step trained nothing and
returned 0. :func:`check_steps_left` refuses it the same way; equal (a run that stopped at its ``max_steps``, resumed)
says that nothing is left to train.

Example:
    >>> progress = {"current": {"ready": 2, "started": 2, "processed": 2, "completed": 2}}
    >>> ckpt = {"loops": {"fit_loop": {"epoch_progress": progress, "epoch_loop.batch_progress": {"is_last_batch": True}}}}
    >>> epochs_done(ckpt)
    (2, False)
    >>> check_epochs_left(ckpt, 1, "--ckpt_path last.ckpt")
    Traceback (most recent call last):
    ...
    pipelines.errors.InputError: --trainer.max_epochs 1: --ckpt_path last.ckpt has already done 2 epoch(s), so a resumed fit would stop at once and train nothing. Give --trainer.max_epochs above 2 to train more epochs (it counts every epoch of the run, those done included), or start a new run (fit without --ckpt_path)
    >>> optimizer = {"optimizer": {"step": {"total": {"ready": 6, "completed": 6}}}}
    >>> steps_done({"loops": {"fit_loop": {"epoch_loop.automatic_optimization.optim_progress": optimizer}}})
    6
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pipelines.errors import InputError

log = logging.getLogger(__name__)


def epochs_done(checkpoint: Mapping[str, Any]) -> tuple[int, bool] | None:
    """``(whole epochs done, whether the next one was begun)`` from the fit loop state a checkpoint holds, as
    Lightning counts them when it resumes (``processed`` epochs; one whose last batch was trained counts as done),
    or ``None`` when the checkpoint has no such state (weights only)."""
    try:
        loop = checkpoint["loops"]["fit_loop"]
        current = loop["epoch_progress"]["current"]
        done, started = int(current["processed"]), int(current["started"])
    except (KeyError, TypeError, ValueError):
        return None
    if started > done and (loop.get("epoch_loop.batch_progress") or {}).get("is_last_batch"):
        return done + 1, False  # saved after the epoch's last batch, before the epoch was counted: Lightning counts it on resume
    return done, started > done


def check_epochs_left(checkpoint: Mapping[str, Any], max_epochs: Any, label: str) -> None:
    """Refuse (``InputError``) a resumed fit whose ``max_epochs`` would let it train nothing; say when a finished
    run is resumed with nothing left to train. ``label`` names the checkpoint (``--ckpt_path FILE``)."""
    counted = epochs_done(checkpoint)
    if counted is None or not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs < 0:
        return  # no loop state, or no epoch limit (None: Lightning's default when max_steps is not set; -1: none)
    done, begun = counted
    if max_epochs < done or (begun and max_epochs == done):
        part = f" and part of epoch {done + 1}" if begun else ""
        raise InputError(
            f"--trainer.max_epochs {max_epochs}: {label} has already done {done} epoch(s){part}, so a resumed fit would stop at "
            f"once and train nothing. Give --trainer.max_epochs above {done} to train more epochs (it counts every epoch of "
            "the run, those done included), or start a new run (fit without --ckpt_path)"
        )
    if max_epochs == done:
        log.info(f"{label} has done all {done} epoch(s) of --trainer.max_epochs {max_epochs}: nothing is left to train")


def steps_done(checkpoint: Mapping[str, Any]) -> int | None:
    """The global step of the fit loop state a checkpoint holds, as Lightning counts it when it resumes (optimizer
    steps: the automatic optimization's, or under manual optimization every ``optimizer.step()``; the count of the
    kind a module does not use stays 0), or ``None`` when the checkpoint has no such state (weights only)."""
    try:
        loop = checkpoint["loops"]["fit_loop"]
    except (KeyError, TypeError):
        return None
    counts = []
    for key, path in (
        ("epoch_loop.automatic_optimization.optim_progress", ("optimizer", "step", "total", "completed")),
        ("epoch_loop.manual_optimization.optim_step_progress", ("total", "completed")),
    ):
        value: Any = loop.get(key) if isinstance(loop, Mapping) else None
        for part in path:
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, int) and not isinstance(value, bool):
            counts.append(value)
    return max(counts) if counts else None


def check_steps_left(checkpoint: Mapping[str, Any], max_steps: Any, label: str) -> None:
    """Refuse (``InputError``) a resumed fit whose ``max_steps`` is below the checkpoint's global step (it would
    train nothing); say when equal (a run finished at its ``max_steps``, resumed). ``label`` names the checkpoint."""
    done = steps_done(checkpoint)
    if done is None or not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
        return  # no loop state, or no step limit (-1: Lightning's default)
    if max_steps < done:
        raise InputError(
            f"--trainer.max_steps {max_steps}: {label} has already done {done} training step(s) (optimizer steps, Lightning's "
            f"global step), so a resumed fit would stop at once and train nothing. Give --trainer.max_steps above {done} to train "
            "more steps (it counts every step of the run, those done included) or -1 for no step limit, or start a new run "
            "(fit without --ckpt_path)"
        )
    if max_steps == done:
        log.info(f"{label} has done all {done} training step(s) of --trainer.max_steps {max_steps}: nothing is left to train")


def check_training_left(checkpoint: Mapping[str, Any], max_epochs: Any, max_steps: Any, label: str) -> None:
    """:func:`check_epochs_left` and :func:`check_steps_left`: a resumed fit with nothing left to train is refused."""
    check_epochs_left(checkpoint, max_epochs, label)
    check_steps_left(checkpoint, max_steps, label)
