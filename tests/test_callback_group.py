"""CallbackGroup (pipelines/callback_group.py): Lightning dispatches several callbacks as one, each hook
reaching the members that implement it, in order; stateful callbacks are refused."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from pipelines.callback_group import CallbackGroup


class Recorder(pl.Callback):
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calls.append(f"{self.name}.epoch_end")


class BatchRecorder(Recorder):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.calls.append(f"{self.name}.batch_end:{batch_idx}")


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_real_trainer_calls_each_members_hooks_in_order_and_only_the_ones_they_implement(tmp_path):
    calls: list[str] = []
    group = CallbackGroup(Recorder("a", calls), BatchRecorder("b", calls), Recorder("c", calls))
    assert "on_train_batch_end" in vars(group) and "on_before_backward" not in vars(group)  # unimplemented hooks stay no-ops
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[group], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2))
    epoch = ["b.batch_end:0", "b.batch_end:1", "a.epoch_end", "b.epoch_end", "c.epoch_end"]
    assert calls == epoch + epoch
    assert group.state_key == "CallbackGroup[Recorder,BatchRecorder,Recorder]"


def test_a_callback_with_checkpoint_state_is_refused():
    from lightning.pytorch.callbacks import EarlyStopping

    with pytest.raises(ValueError, match="EarlyStopping"):
        CallbackGroup(Recorder("a", []), EarlyStopping(monitor="val/loss"))


def test_the_runner_passes_a_profiler_that_measures_nothing_unless_one_is_given_and_hooks_still_run(tmp_path):
    """UnmeasuredProfiler: the runner's Trainer gets it when ``--trainer.profiler`` is not given (a given one is kept),
    and a real Trainer with it calls every hook, as with Lightning's default profiler."""
    from domains.finance import SPEC
    from pipelines.callback_group import UnmeasuredProfiler
    from pipelines.run_callbacks import run_trainer_settings
    from pipelines.run_folder import RunFolder

    run = RunFolder("finance", "profiled", tmp_path / "run", None)
    assert isinstance(run_trainer_settings(SPEC, run, "fit", {}, {"logger": False}, None).overrides["profiler"], UnmeasuredProfiler)
    assert "profiler" not in run_trainer_settings(SPEC, run, "fit", {}, {"logger": False, "profiler": "simple"}, None).overrides
    calls: list[str] = []
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[CallbackGroup(Recorder("a", calls), BatchRecorder("b", calls))], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, profiler=UnmeasuredProfiler(),
    )  # fmt: skip
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2))
    assert trainer.profiler.__class__ is UnmeasuredProfiler
    assert calls == ["b.batch_end:0", "b.batch_end:1", "a.epoch_end", "b.epoch_end"] * 2
