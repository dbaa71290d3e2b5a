"""``fit --ckpt_path last`` with ``--trainer.max_epochs`` below the epochs the checkpoint has done, or
``--trainer.max_steps`` below its global step, is refused before anything is written (pipelines/resume_epochs.py).

Trial finding: resuming the 2-epoch tiny run with ``--trainer.max_epochs 1`` returned 0 having trained nothing, and
rewrote the run's ``config.yaml`` with ``max_epochs: 1``; the same with ``--trainer.max_steps`` below the steps done.
"""

from __future__ import annotations


import pytest

from pipelines.resume_epochs import epochs_done, steps_done
from tests.bad_inputs import folder_digests
from tests.conftest import copy_run, run_pipeline


def test_a_resume_with_max_epochs_below_the_epochs_done_is_refused_and_writes_nothing(tiny_run, runs_dir, capsys):
    run = copy_run(tiny_run("finance"), runs_dir)  # 2 epochs (the domain's test_args)
    before = folder_digests(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_pipeline("finance", "fit", "--ckpt_path", "last", "--run_id", run.name, "--trainer.max_epochs=1", "--trainer.logger=false", "--runs_dir", str(runs_dir))
    err = " ".join(capsys.readouterr().err.split())
    assert stop.value.code == 2 and "Traceback" not in err, err
    assert "--trainer.max_epochs 1:" in err and "has already done 2 epoch(s)" in err and "train nothing" in err and "above 2" in err, err
    assert folder_digests(run) == before, "a refused resume changed the run folder (config.yaml, provenance.json, checkpoints)"


def test_epochs_done_counts_a_checkpoint_saved_mid_epoch_as_begun():
    def checkpoint(started: int, processed: int, last_batch: bool) -> dict:
        progress = {"current": {"ready": started, "started": started, "processed": processed, "completed": processed}}
        return {"loops": {"fit_loop": {"epoch_progress": progress, "epoch_loop.batch_progress": {"is_last_batch": last_batch}}}}

    assert epochs_done(checkpoint(3, 2, last_batch=False)) == (2, True)  # --checkpoint_every_n_steps inside epoch 3
    assert epochs_done(checkpoint(3, 2, last_batch=True)) == (3, False)  # after epoch 3's last batch, before it was counted
    assert epochs_done({"state_dict": {}}) is None  # weights only: nothing to check


def test_a_resume_with_max_steps_below_the_steps_done_is_refused_and_writes_nothing(tiny_run, runs_dir, capsys):
    run = copy_run(tiny_run("finance"), runs_dir)  # 2 epochs of 3 batches: global step 6
    before = folder_digests(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_pipeline("finance", "fit", "--ckpt_path", "last", "--run_id", run.name, "--trainer.max_epochs=5", "--trainer.max_steps=4", "--trainer.logger=false", "--runs_dir", str(runs_dir))
    err = " ".join(capsys.readouterr().err.split())
    assert stop.value.code == 2 and "Traceback" not in err, err
    assert "--trainer.max_steps 4:" in err and "has already done 6 training step(s)" in err and "train nothing" in err and "above 6" in err, err
    assert folder_digests(run) == before, "a refused resume changed the run folder (config.yaml, provenance.json, checkpoints)"


def test_steps_done_reads_the_global_step_of_automatic_and_manual_optimization():
    def checkpoint(automatic: int, manual: int) -> dict:
        return {"loops": {"fit_loop": {
            "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {"step": {"total": {"ready": automatic, "completed": automatic}}}},
            "epoch_loop.manual_optimization.optim_step_progress": {"total": {"ready": manual, "completed": manual}},
        }}}

    assert steps_done(checkpoint(6, 0)) == 6
    assert steps_done(checkpoint(0, 8)) == 8  # manual optimization (the media GAN): every optimizer.step() counts
    assert steps_done({"state_dict": {}}) is None
