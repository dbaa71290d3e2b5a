"""Callbacks a user could pass with ``--trainer.callbacks``; the resume test uses one to slow training down."""

import time

import lightning.pytorch as pl


class PauseEachBatch(pl.Callback):
    """Sleep after every training batch so that a test can kill the run mid-training."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)


class PoisonWeights(pl.Callback):
    """Set every weight of the model to NaN, as a diverged optimiser or a corrupted device would:
    before training step ``step`` (``step >= 0``) or before testing (``step < 0``)."""

    def __init__(self, step: int = -1) -> None:
        self.step = step

    @staticmethod
    def _poison(pl_module: pl.LightningModule) -> None:
        import torch

        with torch.no_grad():
            for parameter in pl_module.parameters():
                parameter.fill_(float("nan"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.step >= 0 and trainer.global_step == self.step:
            self._poison(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        if self.step < 0:
            self._poison(pl_module)
