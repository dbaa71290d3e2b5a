"""Checkpoint choice that breaks ties (pipelines/checkpointing.py), with a real Trainer on metrics whose answer is known."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from pipelines.checkpointing import TieBreakingCheckpoint


class Scripted(pl.LightningModule):
    """Logs scripted validation metrics per epoch: ``val/auroc`` and ``val/loss`` from the given lists."""

    def __init__(self, auroc: list[float], loss: list[float]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.auroc, self.loss = auroc, loss

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        epoch = self.current_epoch
        self.log("val/auroc", self.auroc[epoch])
        self.log("val/loss", self.loss[epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=4)

    val_dataloader = train_dataloader


def fit(tmp_path, checkpoint: ModelCheckpoint, auroc: list[float], loss: list[float]) -> int:
    """Fit for len(auroc) epochs; the epoch of the kept checkpoint."""
    trainer = pl.Trainer(max_epochs=len(auroc), callbacks=[checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Scripted(auroc, loss))
    return torch.load(checkpoint.best_model_path, weights_only=True)["epoch"]


def best(tmp_path, cls=TieBreakingCheckpoint, **kwargs) -> ModelCheckpoint:
    return cls(dirpath=tmp_path, filename="best", monitor="val/auroc", mode="max", save_top_k=1, enable_version_counter=False, **kwargs)


def test_a_saturated_monitor_keeps_the_epoch_with_the_lowest_loss(tmp_path):
    auroc, loss = [1.0, 1.0, 1.0, 1.0], [18.5, 2.0, 0.3, 0.9]
    assert fit(tmp_path / "plain", best(tmp_path / "plain", ModelCheckpoint), auroc, loss) == 0  # what Lightning alone keeps
    checkpoint = best(tmp_path / "tie")
    assert fit(tmp_path / "tie", checkpoint, auroc, loss) == 2
    assert checkpoint.tie_breaks == 2 and checkpoint.kept_tie_break_value == 0.30000001192092896


def test_the_primary_monitor_still_decides_when_it_differs(tmp_path):
    # epoch 1 is better on AUROC though its loss is worse; epoch 2 ties with epoch 1 at a worse loss: not kept
    checkpoint = best(tmp_path)
    assert fit(tmp_path, checkpoint, [0.8, 0.9, 0.9, 0.7], [0.5, 0.6, 0.7, 0.1]) == 1
    assert checkpoint.tie_breaks == 0


def test_the_secondary_value_survives_a_resume(tmp_path):
    checkpoint = best(tmp_path)
    fit(tmp_path, checkpoint, [1.0, 1.0], [3.0, 1.0])
    state = checkpoint.state_dict()
    restored = best(tmp_path)
    restored.load_state_dict(state)
    assert restored.kept_tie_break_value == 1.0 and restored.state_key == ModelCheckpoint(monitor="val/auroc", mode="max", save_top_k=1).state_key


def test_a_tie_break_on_the_monitor_itself_is_ignored():
    assert TieBreakingCheckpoint(monitor="val/loss", mode="min").tie_break is None
