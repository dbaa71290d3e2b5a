"""Several mini-batches per Lightning step under real DDP (2 CPU processes, gloo, started by the runner's ``ddp``
strategy): every rank ends with the same weights, and they are the weights of one mini-batch per step.

Slow (two 2-process fits, ~30 s): ``python -m benchmarks.slow_checks -k grouped`` runs it; the in-process checks of the
same numerics on one process are tests/test_grouped_steps.py.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import run_pipeline_process


class RankWeights(pl.Callback):
    """Write each process's weights and global step to ``folder/rank{R}.pt`` when its fit ends (only rank zero writes
    checkpoints: this shows what every rank holds)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = {key: value.detach().cpu().clone() for key, value in pl_module.state_dict().items()}
        torch.save({"weights": weights, "global_step": trainer.global_step, "world_size": trainer.world_size}, self.folder / f"rank{trainer.global_rank}.pt")


def _ddp_fit(tmp_path: Path, batches_per_step: int) -> list[dict]:
    folder = tmp_path / f"k{batches_per_step}"
    result = run_pipeline_process(
        "finance", "fit", "--runs_dir", str(tmp_path / "runs"), "--data.synthetic_rows=3000", "--data.batch_size=64",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=8", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
        f"--model.batches_per_step={batches_per_step}",
        "--trainer.callbacks+=tests.test_grouped_steps_ddp.RankWeights", f"--trainer.callbacks.folder={folder}",
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def _equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    """The keys whose tensors differ (NaN where both are NaN counts as equal: an uncalibrated threshold)."""
    assert first.keys() == second.keys()
    return [key for key, value in first.items()
            if not (torch.equal(value, second[key]) or (value.is_floating_point() and bool(torch.isnan(value).all() and torch.isnan(second[key]).all())))]  # fmt: skip


@pytest.mark.slow
def test_two_process_ddp_with_groups_of_four_ends_with_the_weights_of_one_batch_per_step_on_every_rank(tmp_path):
    """gloo DDP, 2 ranks, ``limit_train_batches 8`` (two groups of 4 per rank and epoch), two epochs: with
    ``--model.batches_per_step 4`` both ranks hold bitwise the same weights, and they equal those of ``--model.batches_per_step 1``
    (the same all-reduced gradients in the same order: the grouped batch sampler Lightning re-creates with each rank's
    DistributedSampler hands out the plain loop's batches)."""
    one = _ddp_fit(tmp_path, 1)
    grouped = _ddp_fit(tmp_path, 4)
    for ranks in (one, grouped):
        assert [r["world_size"] for r in ranks] == [2, 2]
        assert ranks[0]["global_step"] == ranks[1]["global_step"] == 16  # 8 mini-batches per epoch, 2 epochs: optimizer steps
    assert _equal(grouped[0]["weights"], grouped[1]["weights"]) == []
    assert _equal(one[0]["weights"], one[1]["weights"]) == []
    assert _equal(one[0]["weights"], grouped[0]["weights"]) == []
    assert any(key.startswith("network.") for key in one[0]["weights"]), "the network's weights are among those compared"
