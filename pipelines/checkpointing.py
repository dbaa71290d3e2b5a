"""Checkpoint choice that breaks ties: :class:`TieBreakingCheckpoint`.

Lightning's ``ModelCheckpoint`` keeps a new checkpoint only when the monitored metric is strictly
better than the kept one. A metric that saturates (a validation AUROC of 1.0 from epoch 0 on a
separable set, an accuracy that moves by whole images) then ties for the rest of training, and the
degenerate first epoch is what ``best.ckpt`` holds: a 3-D toy set kept its epoch-0 model (AUROC 1.0,
loss 18.5) and tested at accuracy 0.5. Here a tie on the primary monitor is decided by a secondary
monitor (by default ``val/loss``, lower is better): the later epoch replaces the kept one when it ties
on the primary metric and is strictly better on the secondary one.

Only public API: ``check_monitor_top_k`` (the decision) and the callback's ``state_dict`` /
``load_state_dict`` (the secondary value of the kept checkpoint survives a resume).

Example:
    >>> checkpoint = TieBreakingCheckpoint(monitor="val/auroc", mode="max")
    >>> checkpoint.tie_break, checkpoint.tie_break_mode
    ('val/loss', 'min')
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

#: The secondary monitor used when the primary one ties (every supervised domain logs it).
DEFAULT_TIE_BREAK = ("val/loss", "min")


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item() if value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None


class TieBreakingCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (``save_top_k=1``) whose ties on ``monitor`` are broken by ``tie_break``.

    Args:
        tie_break: the secondary metric. Ignored when it is the monitor itself or is not logged (then
            ties keep the earlier checkpoint, as ``ModelCheckpoint`` does).
        tie_break_mode: ``"min"`` when a smaller ``tie_break`` is better, ``"max"`` otherwise.
        **kwargs: ``ModelCheckpoint``'s arguments (``monitor``, ``mode``, ``dirpath``, ...).

    A tie is exact equality of the primary values (as logged, float32): saturated metrics tie exactly.
    With ``save_top_k`` other than 1 the secondary monitor is not used.
    """

    def __init__(self, tie_break: str | None = DEFAULT_TIE_BREAK[0], tie_break_mode: Literal["min", "max"] = "min", **kwargs: Any) -> None:
        if tie_break_mode not in ("min", "max"):
            raise ValueError(f"tie_break_mode must be 'min' or 'max', got {tie_break_mode!r}")
        super().__init__(**kwargs)
        self.tie_break = tie_break if tie_break != self.monitor else None
        self.tie_break_mode = tie_break_mode
        self.kept_tie_break_value: float | None = None  # the secondary value of the checkpoint kept now
        self.tie_breaks: int = 0  # how many times a tie was decided by the secondary monitor

    def _secondary(self, trainer: pl.Trainer) -> float | None:
        return _number(trainer.callback_metrics.get(self.tie_break)) if self.tie_break else None

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        better = super().check_monitor_top_k(trainer, current)
        secondary = self._secondary(trainer)
        if not better and current is not None and self.save_top_k == 1 and self.best_k_models:
            kept = self.best_k_models[self.kth_best_model_path]
            tied = bool(torch.eq(current.detach().float().cpu(), torch.as_tensor(kept).detach().float().cpu()))
            if tied and secondary is not None and self.kept_tie_break_value is not None:
                wins = secondary < self.kept_tie_break_value if self.tie_break_mode == "min" else secondary > self.kept_tie_break_value
                better = trainer.strategy.reduce_boolean_decision(bool(wins))
                self.tie_breaks += int(better)
        if better:  # a save follows: remember the kept checkpoint's secondary value
            self.kept_tie_break_value = secondary
        return better

    @property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s own key, so a run started before tie-breaking resumes with its kept score.

        Lightning reads it at every callback hook (six per training step) and ``ModelCheckpoint`` formats it
        from its settings each time; the settings are fixed at construction, so it is built once."""
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)
        return key

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kept_tie_break_value": self.kept_tie_break_value, "tie_breaks": self.tie_breaks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.kept_tie_break_value = state_dict.get("kept_tie_break_value", self.kept_tie_break_value)
        self.tie_breaks = int(state_dict.get("tie_breaks", self.tie_breaks))
