"""Several mini-batches per Lightning training step (``--model.batches_per_step``, pipelines/grouped_steps.py):
the same optimizer trajectory, logged values and stops as one mini-batch per step."""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from domains.autonomous import SPEC as AUTONOMOUS
from domains.finance import SPEC as FINANCE
from pipelines.grouped_steps import BatchGroup, GroupedBatchSampler, group_size
from pipelines.guards import NonFiniteLossError, NonFiniteLossGuard

SMALL = {
    "finance": (FINANCE, {"synthetic_rows": 1500, "batch_size": 32}, {"hidden_dims": [16], "latent_dim": 4, "dropout": 0.1}),
    # teacher forcing and rotation draw random numbers on every mini-batch: their order is checked too
    "autonomous": (AUTONOMOUS, {"sim_vehicles": 30, "batch_size": 16, "augment_rotation": True}, {"hidden_size": 8, "embed_size": 4, "teacher_forcing": 0.5}),
}


def _build(domain: str, batches_per_step: int, **model_options):
    spec, data_options, options = SMALL[domain]
    config = yaml.safe_load(spec.config.read_text())  # the domain's defaults (finance's column roles)
    module, _, name = spec.datamodule_class.rpartition(".")
    dm = getattr(importlib.import_module(module), name)(**{**config["data"], **data_options})
    dm.setup("fit")
    module, _, name = spec.model_class.rpartition(".")
    links = {argument: getattr(dm, attribute) for attribute, argument in spec.links}
    return dm, getattr(importlib.import_module(module), name)(**{**config["model"], **links, **options, **model_options, "batches_per_step": batches_per_step})


def _fit(tmp_path: Path, domain: str, batches_per_step: int, callbacks=(), model_options=None, lightning_writes_loss=False, **trainer_options):
    pl.seed_everything(3, verbose=False)
    dm, model = _build(domain, batches_per_step, **(model_options or {}))
    model.groups_mini_batches = not lightning_writes_loss  # False: train/loss_step written by Lightning, as for every other task
    folder = tmp_path / f"{domain}{batches_per_step}"
    trainer = pl.Trainer(
        **{"max_epochs": 2, "log_every_n_steps": 3, "limit_val_batches": 2, **trainer_options},
        logger=CSVLogger(folder, name="", version=""), enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[NonFiniteLossGuard(), *callbacks], default_root_dir=folder,
    )
    trainer.fit(model, datamodule=dm)
    rows = list(csv.DictReader(open(folder / "metrics.csv"))) if (folder / "metrics.csv").is_file() else []
    return trainer, model, rows


def _same_run(one, grouped) -> None:
    (trainer1, model1, rows1), (trainer8, model8, rows8) = one, grouped
    assert trainer8.global_step == trainer1.global_step
    for key, value in model1.state_dict().items():  # bitwise: the same float operations in the same order
        other = model8.state_dict()[key]  # (a threshold no validation calibrated is NaN in both)
        assert torch.equal(value, other) or (value.is_floating_point() and bool(torch.isnan(value).all() and torch.isnan(other).all())), key
    assert any(row.get("train/loss_step") for row in rows1) and any(row.get("train/loss_epoch") for row in rows1)
    # train/loss_step rows: the same values at the same steps; the rows Lightning writes itself (epoch means,
    # validation, learning rate) carry its own step count, of groups (docs/runner.md): the same values
    assert [row for row in rows8 if row.get("train/loss_step")] == [row for row in rows1 if row.get("train/loss_step")]
    assert [{**row, "step": None} for row in rows8] == [{**row, "step": None} for row in rows1]
    assert model8.trainer.callback_metrics.keys() == model1.trainer.callback_metrics.keys()
    for key, value in model1.trainer.callback_metrics.items():  # what the runner's metrics.jsonl and summary.json record
        assert torch.equal(value, model8.trainer.callback_metrics[key]), key
    assert trainer8.optimizers[0].param_groups[0]["lr"] == trainer1.optimizers[0].param_groups[0]["lr"]


@pytest.mark.parametrize("domain", ["finance", "autonomous"])
def test_groups_of_mini_batches_follow_the_one_batch_per_step_trajectory(tmp_path, domain):
    one = _fit(tmp_path, domain, 1, lightning_writes_loss=domain == "autonomous")
    if domain == "finance":  # train/loss_step written to the loggers by the task gives Lightning's rows, steps included
        assert _fit(tmp_path / "lightning", "finance", 1, lightning_writes_loss=True)[2] == one[2]
    grouped = _fit(tmp_path, domain, 8)
    assert not grouped[1].automatic_optimization and one[1].automatic_optimization
    assert grouped[0].num_training_batches < one[0].num_training_batches  # the steps were groups: the epoch's last one partial
    _same_run(one, grouped)


def test_max_steps_and_limit_train_batches_count_mini_batches(tmp_path):
    """A stop inside a group (max_steps 11 with groups of 4) and a limit of 5 batches per epoch (groups 4 + 1)."""
    _same_run(_fit(tmp_path, "finance", 1, max_steps=11), _fit(tmp_path, "finance", 4, max_steps=11))
    (tmp_path / "again").mkdir()
    one, grouped = _fit(tmp_path / "again", "finance", 1, limit_train_batches=5), _fit(tmp_path / "again", "finance", 4, limit_train_batches=5)
    assert grouped[0].global_step == 10 and grouped[0].num_training_batches == 2
    _same_run(one, grouped)


class PoisonBeforeStep(pl.Callback):
    """NaN weights after optimizer step ``step``: the next mini-batch's loss is NaN (``on_before_optimizer_step``
    runs for every mini-batch of a group, unlike ``on_train_batch_start``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            for parameter in pl_module.parameters():
                parameter.grad = torch.full_like(parameter, float("nan"))


def test_divergence_stops_at_the_same_step_inside_a_group(tmp_path):
    messages = []
    for k in (1, 8):
        with pytest.raises(NonFiniteLossError) as stop:
            _fit(tmp_path, "finance", k, callbacks=[PoisonBeforeStep(5)])
        messages.append(str(stop.value))
    assert messages[0] == messages[1] and "by global step 7" in messages[0]  # step 6 (index 5) stepped NaN, the 7th loss is NaN


def test_settings_that_count_lightning_steps_keep_one_mini_batch_per_step(tmp_path):
    """Gradient clipping and accumulation need automatic optimisation; a fractional limit or a
    mid-epoch validation would count groups: the task trains one mini-batch per step, as before, and says so."""
    for options in ({"gradient_clip_val": 1.0}, {"accumulate_grad_batches": 2}, {"limit_train_batches": 0.5}, {"val_check_interval": 5}):
        trainer, model, _ = _fit(tmp_path, "finance", 4, max_epochs=1, **options)
        assert model.automatic_optimization and group_size(model) == 1 and model.hparams.batches_per_step == 4, options
        assert not isinstance(next(iter(trainer.train_dataloader)), BatchGroup)


def test_grouped_sampler_gives_the_plain_batches_in_groups():
    batches = list(torch.utils.data.BatchSampler(range(23), 4, drop_last=True))
    groups = list(GroupedBatchSampler(range(23), 4, True, batches_per_group=3))
    assert [index for group in groups for index in group] == [index for batch in batches for index in batch] and len(groups) == 2
    group = BatchGroup({"x": torch.arange(10)}, batch_size=4)
    assert [b["x"].tolist() for b in group] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and len(group) == 3


class SaveAtStep(pl.Callback):
    """Save a checkpoint at the end of the training step that reaches ``step`` (as a signal's stop does)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_a_run_resumed_mid_epoch_takes_the_mini_batches_of_the_plain_loop(tmp_path):
    """Stopped after 16 steps of a 27-batch epoch (two groups of 8), resumed to the end of epoch 2: the
    resumed epoch restarts the loader and ends after 11 more mini-batches, not 2 more groups of 8."""
    runs = []
    for k in (1, 8):
        checkpoint = tmp_path / f"stopped{k}.ckpt"
        _fit(tmp_path / f"first{k}", "finance", k, callbacks=[SaveAtStep(16, checkpoint)], max_steps=20)
        pl.seed_everything(5, verbose=False)
        dm, model = _build("finance", k)
        trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
        trainer.fit(model, datamodule=dm, ckpt_path=checkpoint)
        runs.append((trainer, model))
    assert runs[0][0].global_step == runs[1][0].global_step == 27 * 2
    for key, value in runs[0][1].state_dict().items():
        assert torch.equal(value, runs[1][1].state_dict()[key]), key


def test_groups_from_shards_with_several_loader_workers_are_refused_before_the_run_folder_exists(tmp_path, capsys):
    """``--model.batches_per_step 4`` with ``--data.num_workers 2`` on row shards (each worker's stream ends on a short batch):
    the real CLI refuses it (exit 2, one paragraph) before the run folder or the W&B run exist, not when training starts."""
    from domains.finance.shards_write import write_shards
    from tests.bad_inputs import BadInput, check_refused
    from tests.test_shards_finance import CONFIG

    case = BadInput("groups-with-workers", ("fit", "--data.shards", "{tmp}/set", "--data.num_workers=2", "--model.batches_per_step=4"),
                    ("--model.batches_per_step 4 with --data.num_workers 2", "use --data.num_workers 1 (or 0) or --model.batches_per_step 1"),
                    lambda files: write_shards({**CONFIG, "synthetic_rows": 600}, str(files / "set"), samples_per_shard=40))  # fmt: skip
    (tmp_path / "case").mkdir()  # (enough shards for two workers in every split: only the groups are refused)
    check_refused("finance", case, tmp_path / "case", capsys)

