"""Callbacks a user could pass with ``--trainer.callbacks``; the resume test uses one to slow training down."""

import time

import lightning.pytorch as pl


class PauseEachBatch(pl.Callback):
    """Sleep after every training batch so that a test can kill the run mid-training."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)
