"""Lightning's Tuner, read with care: the learning-rate range test behind ``--lr_find``.

``--scale_batch_size`` needs nothing beyond Lightning's ``Tuner.scale_batch_size``; the range test
does: its suggestion is unreliable (see :func:`suggest_learning_rate`), and under DDP every rank
would read its own curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np

from pipelines.plots import new_figure
from pipelines.tracking import log_figure


#: Points of Lightning's learning-rate range test left out when reading its curve. Its smoothed loss
#: is bias-corrected one step too far (``1 - beta ** (global_step + 1)`` after the step has counted),
#: so the first points read low, about half the loss at the first and within 2 % only after ~30
#: (Lightning #14167): the curve rises at tiny learning rates whatever the model.
LR_FIND_SKIP = 30


def suggest_learning_rate(lrs: list[float], losses: list[float], planned: int | None = None, skip: int = LR_FIND_SKIP) -> tuple[float | None, str]:
    """A learning rate from a range test's curve: one tenth of the one with the lowest loss
    (Smith's range test as fastai reads it, ``lr_min / 10``), or ``None`` and why not.

    Lightning's own suggestion (the steepest point of the curve) lands on noise when the curve is
    flat or noisy, and on the warm-up of its smoothing when that is left in. Here the loss must fall
    at least 2 % below the median of the ten learning rates after the ``skip`` smallest, at a larger one,
    and a test that ended before its ``planned`` points must have ended by diverging (a loss above 4x
    the lowest, Lightning's stop): one cut short by ``max_epochs`` never reached the large learning rates.

    Example:
        >>> lrs = [10.0 ** (k - 14) for k in range(15)]
        >>> suggest_learning_rate(lrs, [1.0] * 10 + [0.9, 0.5, 0.3, 0.6, 9.0], skip=0)
        (0.001, '')
        >>> suggest_learning_rate(lrs, [1.0] * 10 + [1.0, 1.1, 1.2, 1.5, 9.0], skip=0)[1]
        'the loss did not fall (lowest 1 at lr 0.0001, against 1 at the smallest learning rates)'
        >>> suggest_learning_rate(lrs[:12], [1.0] * 10 + [0.9, 0.8], planned=15, skip=0)[1]
        'the range test stopped after 12 of 15 learning rates, below lr 0.001: it takes one training step per learning rate, so raise max_epochs'
    """
    if len(losses) <= skip + 10 or (planned and len(losses) < planned and losses[-1] <= 4 * min(losses)):
        return None, (
            f"the range test stopped after {len(losses)} of {planned or len(losses)} learning rates, below lr {lrs[-1]:.3g}: "
            "it takes one training step per learning rate, so raise max_epochs"
        )
    reference = float(np.median(losses[skip : skip + 10]))
    lowest = skip + 10 + int(np.argmin(losses[skip + 10 :]))
    if losses[lowest] >= 0.98 * reference:
        return None, f"the loss did not fall (lowest {losses[lowest]:.3g} at lr {lrs[lowest]:.3g}, against {reference:.3g} at the smallest learning rates)"
    return lrs[lowest] / 10, ""


def check_lr_findable(model: Any) -> None:
    """Refuse ``--lr_find`` for a model without one learning rate ``lr`` or with manual optimisation."""
    if "lr" not in model.hparams or not model.automatic_optimization:
        raise ValueError(
            f"--lr_find needs a model with one learning rate `lr` and automatic optimisation; {type(model).__name__} "
            f"has {sorted(k for k, v in model.hparams.items() if k.startswith('lr') and isinstance(v, (int, float)) and not isinstance(v, bool)) or 'no lr'}"
            f"{'' if model.automatic_optimization else ' and optimises manually'}"
        )


def find_learning_rate(trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any) -> tuple[float | None, str, Path | None]:
    """Run Lightning's learning-rate range test on ``model`` (weights restored afterwards) and return
    the learning rate to train with (or ``None``), why not when ``None``, and the curve's plot
    (``plots/tuner_lr_find.png``, also logged to W&B). Under DDP every rank tests on its own shard and
    rank zero's reading is broadcast, so that all ranks train with the same learning rate.

    Raises:
        ValueError: the model has no single learning rate ``lr`` or optimises manually.
    """
    from lightning.pytorch.tuner import Tuner

    check_lr_findable(model)
    finder = Tuner(trainer).lr_find(model, datamodule=datamodule, attr_name="lr", update_attr=False)
    if finder is None:  # fast_dev_run: Lightning skips the search
        return None, "skipped under fast_dev_run", None
    suggestion, reason = trainer.strategy.broadcast(
        suggest_learning_rate(finder.results["lr"], finder.results["loss"], planned=finder.num_training), src=0
    )
    figure, axes = new_figure()
    finder.plot(suggest=False, ax=axes)
    if suggestion is not None:
        figure.axes[0].axvline(suggestion, color="red", linestyle="--", label=f"suggested {suggestion:.3g}")
        figure.axes[0].legend()
    return (float(suggestion) if suggestion is not None else None), reason, log_figure(trainer, figure, "tuner/lr_find")
