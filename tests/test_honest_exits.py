"""Honest exits (issue 15): a run stopped by a signal, a diverged run and a NaN test metric never
exit 0; the checkpoint that matters is kept; outputs are never overwritten; a run folder in use is
refused; the run a command works on comes from the fully parsed config."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelines.errors import InputError
from tests.conftest import ROOT, child_env, only_run, read_jsonl, run_pipeline
from tests.processes import ChildProcesses

FINANCE = ("--data.synthetic_rows=1200", "--data.batch_size=64", "--trainer.limit_train_batches=8", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2")


def exit_code(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline(*args)
    return exit_info.value.code


def start_slow_fit(children: ChildProcesses, runs_dir: Path, run_id: str) -> subprocess.Popen:
    args = ["finance", "fit", *FINANCE, "--trainer.max_epochs=50", "--runs_dir", str(runs_dir), "--run_id", run_id,
            "--trainer.callbacks+=tests.helpers.PauseEachBatch", "--trainer.callbacks.seconds=0.15"]  # fmt: skip
    # SIGINT as a terminal delivers it: a suite started in the background (`pytest &`) hands its children SIGINT ignored
    return children.start([sys.executable, "-m", "pipelines.run", *args], cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not path.exists():
        time.sleep(0.05)
    assert process.poll() is None, f"the run ended early: {process.stderr.read()[-3000:]}"
    assert path.exists(), f"{path} never appeared"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_fit_writes_last_ckpt_exits_non_zero_and_the_run_resumes(runs_dir, sig, code, capsys, child_processes):
    process = start_slow_fit(child_processes, runs_dir, "stopped")
    last = runs_dir / "finance" / "stopped" / "checkpoints" / "last.ckpt"
    wait_for(last, process)  # epoch 0 validated: 8 steps
    if sig == signal.SIGTERM:  # while it trains, the run folder is in use: a second command on it is refused
        process.send_signal(signal.SIGSTOP)  # frozen (holding its lock) for as long as the second command takes
        try:
            check_a_second_command_is_refused(runs_dir / "finance" / "stopped", runs_dir, capsys)
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            process.send_signal(signal.SIGCONT)
    time.sleep(0.6)  # a few steps into epoch 1
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-3000:]
    assert f"stopped by {sig.name}" in err and "--ckpt_path last --run_id stopped" in err, err[-2000:]
    assert "Traceback" not in err
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] > 8, "last.ckpt must hold the step training stopped at, not the last validation"
    assert not list(last.parent.glob(".*.tmp"))
    run = only_run(runs_dir, "finance")
    assert len(read_jsonl(run / "metrics.jsonl")) < 3, "stopped in epoch 1"
    run_pipeline("finance", "fit", "--runs_dir", str(runs_dir), "--run_id", "stopped", "--ckpt_path", "last", "--trainer.max_epochs=3")
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 24, (resumed["epoch"], resumed["global_step"])
    # the resume continued the same run folder and W&B run (finance's case of tests/test_registry.py's killed-run test)
    assert only_run(runs_dir, "finance") == run, "resume must continue the same run folder"
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["stage"] == "fit"]
    assert sorted({r["epoch"] for r in rows}) == [0, 1, 2] and rows[-1]["epoch"] == 2 and rows[-1]["step"] == 3 * rows[0]["step"] == 24
    invocations = json.loads((run / "provenance.json").read_text())["invocations"]
    assert len(invocations) == 2 and invocations[1]["ckpt_path"].endswith("last.ckpt")
    assert len(list(run.glob("wandb/offline-run-*"))) == 2  # the same W&B run id, resumed
    assert all(p.name.endswith(run.name) for p in run.glob("wandb/offline-run-*"))


def test_a_non_finite_loss_stops_fit_with_exit_1_and_keeps_the_last_finite_checkpoint(runs_dir, capsys):
    code = exit_code("finance", "fit", *FINANCE, "--trainer.max_epochs=3", "--runs_dir", str(runs_dir),
                     "--trainer.callbacks+=tests.helpers.PoisonWeights", "--trainer.callbacks.step=11")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "diverged" in err and "by global step 12" in err.replace("\n  ", " "), err[-2000:]
    run = only_run(runs_dir, "finance")
    for name in ("last.ckpt", "best.ckpt"):
        state = torch.load(run / "checkpoints" / name, weights_only=True)
        assert state["global_step"] == 8, name
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point()), name


def test_a_nan_test_metric_is_recorded_and_exits_1(runs_dir, capsys):
    from pipelines.domain_registry import get_domain

    code = exit_code("autonomous", *get_domain("autonomous").test_args, "--trainer.max_epochs=1", "--runs_dir", str(runs_dir),
                     "--trainer.callbacks+=tests.helpers.PoisonWeights", "--trainer.callbacks.step=-1")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "test/loss = nan" in err and "means nothing" in err, err[-2000:]
    summary = json.loads((only_run(runs_dir, "autonomous") / "summary.json").read_text())
    assert summary["test"]["test/loss"] == "nan"


def check_a_second_command_is_refused(run: Path, runs_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A second command on the run folder of a training fit (``run``, in use) is refused, changing nothing
    (called by the signal test above, on its training process: one slow fit serves both)."""
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "provenance.json")}
    capsys.readouterr()
    assert exit_code("finance", "fit", *FINANCE, "--runs_dir", str(runs_dir), "--run_id", run.name) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is in use by pid" in err and "fit since" in err, err[-2000:]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert {name: (run / name).read_bytes() for name in before} == before


def test_predict_never_overwrites_and_runs_dir_comes_from_a_config_file(runs_dir, tmp_path, capsys):
    run_pipeline("finance", "fit", *FINANCE, "--trainer.max_epochs=1", "--runs_dir", str(runs_dir), "--run_id", "p1")
    run = runs_dir / "finance" / "p1"
    # runs_dir from a --config file (the bug: the run's config was looked up in ./runs, the default data used)
    config = tmp_path / "where.yaml"
    config.write_text(f"runs_dir: {runs_dir}\n")
    predict = ("finance", "predict", "--config", str(config), "--run_id", "p1", "--ckpt_path", "best", "--trainer.limit_predict_batches=1")
    run_pipeline(*predict)
    assert "using model, data from" in capsys.readouterr().err
    first = (run / "predictions.csv").read_bytes()
    run_pipeline(*predict)
    assert (run / "predictions.csv").read_bytes() == first and (run / "predictions-2.csv").is_file()
    assert exit_code(*predict, "--output", "predictions-2.csv") == 2
    assert "already exists" in capsys.readouterr().err
    run_pipeline(*predict, "--output", "nightly.csv")
    assert (run / "nightly.csv").read_bytes() == first
    assert not list(run.glob(".*.partial"))


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(InputError, match="unrecognized arguments"):
        run_pipeline("finance", "fit", "--model.lrr", "1", "--debug")
    assert exit_code("finance", "fit", "--model.lrr", "1") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "did you mean '--model.lr'" in err


def test_a_misspelt_sub_command_is_refused_with_did_you_mean(capsys):
    assert exit_code("finance", "fitt") == 2
    err = capsys.readouterr().err
    assert "unknown sub-command 'fitt'" in err and "did you mean 'fit'" in err and "Traceback" not in err


def test_a_nan_monitored_metric_does_not_crash_the_wandb_upload_after_training(tmp_path):
    """A NaN validation score becomes a checkpoint score of inf, which W&B refused in the model
    artifact's metadata at the end of fit ('Out of range float values are not JSON compliant')."""
    import lightning.pytorch as pl
    import wandb
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pipelines.run_folder import RunFolder
    from pipelines.tracking import make_wandb_logger
    from tests.wandb_offline import history, run_file

    class Task(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val/score", float("nan"))
            self.log("val/auroc", 0.75)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 2)), batch_size=4)
    logger = make_wandb_logger(RunFolder("finance", "nan-run", tmp_path / "nan-run", None))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/score", mode="min")
    trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(Task(), data, data)
    finally:
        wandb.finish()
    assert checkpoint.best_model_path and trainer.state.finished
    rows = history(run_file(tmp_path / "nan-run"))
    assert [row["val/auroc"] for row in rows if "val/auroc" in row] == [0.75] and not any("val/score" in row for row in rows)


def test_a_file_that_is_not_a_checkpoint_and_a_broken_yaml_are_refused_naming_them(tmp_path, capsys):
    fake = tmp_path / "model.ckpt"
    fake.write_text("not a checkpoint\n")
    assert exit_code("finance", "test", "--ckpt_path", str(fake), "--runs_dir", str(tmp_path / "runs")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--ckpt_path {fake}: not a Lightning checkpoint" in err and "weights_only=False" not in err, err
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  lr: 0.1\n hidden: 3\n")
    assert exit_code("finance", "--config", str(broken), "--runs_dir", str(tmp_path / "runs")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--config {broken}: not valid YAML" in err and "line 3" in err, err
    # a UTF-16 file (it crashed the parser, exit 1), an empty one, a key given twice (silently last-wins), a list
    for name, content, expected in [("utf16.yaml", "trainer:\n  max_epochs: 1\n".encode("utf-16"), "utf-16 text"),
                                    ("empty.yaml", b"", "the file is empty"),
                                    ("twice.yaml", b"trainer:\n  max_epochs: 1\n  max_epochs: 5\n", "key 'max_epochs' appears twice (lines 2 and 3)"),
                                    ("list.yaml", b"- a\n- b\n", "holds a yaml list; expected a mapping")]:  # fmt: skip
        (tmp_path / name).write_bytes(content)
        assert exit_code("finance", "--config", str(tmp_path / name), "--runs_dir", str(tmp_path / "runs")) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"--config {tmp_path / name}: " in err and expected in err.lower(), err
    assert not (tmp_path / "runs").exists()


def test_a_fit_that_trains_nothing_is_refused_before_anything_is_written(tmp_path, capsys):
    """--trainer.limit_train_batches 0 used to skip training, test the untrained network and report its AUROC with exit 0."""
    runs = tmp_path / "runs"
    for option in ("--trainer.limit_train_batches=0", "--trainer.max_epochs=0", "--trainer.max_steps=0"):
        assert exit_code("finance", *FINANCE, option, "--runs_dir", str(runs)) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"--trainer.{option.split('.')[1].split('=')[0]} 0" in err and "no training step" in err, err
    assert not runs.exists()
