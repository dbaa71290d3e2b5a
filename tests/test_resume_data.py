"""``fit --ckpt_path last`` continues a run on the data it started with, or is refused before anything is written.

Trial finding: a resume with another ``--data.path``, or with the rolling file replaced in place, went on
silently (exit 0) scaling the new rows with the old file's statistics and comparing two validation sets
in one ``best.ckpt`` series.
"""

from __future__ import annotations

import pytest

from domains.finance.synthetic import make_card_transactions
from tests.conftest import run_pipeline

TINY = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.logger=false",
        "--data.batch_size=64", "--model.hidden_dims=[16]", "--model.latent_dim=4"]  # fmt: skip


def refused(capsys, *args: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_pipeline(*args)
    err = " ".join(capsys.readouterr().err.split())
    assert stop.value.code == 2 and "Traceback" not in err, err
    return err


def test_a_resumed_fit_refuses_other_data_and_a_replaced_file_and_resumes_on_the_same(tmp_path, capsys):
    data, other = tmp_path / "latest.csv", tmp_path / "other.csv"
    make_card_transactions(600, fraud_rate=0.05, seed=0).to_csv(data, index=False)
    make_card_transactions(600, fraud_rate=0.05, seed=1).to_csv(other, index=False)
    fit = ["finance", "fit", "--runs_dir", str(tmp_path / "runs"), "--run_id", "r", *TINY]
    run_pipeline(*fit, "--data.path", str(data), "--trainer.max_epochs=1")
    last = tmp_path / "runs" / "finance" / "r" / "checkpoints" / "last.ckpt"
    written = last.stat().st_mtime_ns
    resume = [*fit, "--ckpt_path", "last", "--trainer.max_epochs=2"]

    err = refused(capsys, *resume, "--data.path", str(other))
    assert f"--data.path '{other}': with --ckpt_path" in err and f"--data.path '{data}' there" in err and "start a new run" in err, err
    err = refused(capsys, *resume, "--data.split_seed=3")
    assert "--data.split_seed 3" in err and "--data.split_seed 0 there" in err, err

    frame = make_card_transactions(600, fraud_rate=0.05, seed=0)
    frame["amount"] *= 1000  # the rolling export replaced under the same name (cents instead of euros)
    original = data.read_bytes()
    frame.to_csv(data, index=False)
    err = refused(capsys, *resume)
    assert f"--data.path {data}: the file changed since the run started" in err and "Start a new run" in err, err
    assert last.stat().st_mtime_ns == written, "a refused resume wrote nothing"

    data.unlink()
    err = refused(capsys, *resume)
    assert f"--data.path {data}: with --ckpt_path" in err and "which is gone" in err, err
    data.write_bytes(original)  # the same contents again (a new modification time): resumes, also with a reading option changed
    run_pipeline(*resume, "--data.num_workers=0")
    assert last.stat().st_mtime_ns != written


def test_a_damaged_record_of_the_data_files_is_refused_naming_it():
    """A checkpoint from elsewhere whose record of its data files is not what DataFilesRecord writes: exit 2 naming it, no crash."""
    from pipelines.errors import InputError
    from pipelines.resume_data import DataFilesRecord, check_resumed_data

    for record in ({"path": "x.csv"}, "x.csv", None):
        checkpoint = {"callbacks": {DataFilesRecord.__qualname__: {"files": {"path": record}}}}
        with pytest.raises(InputError, match=r"last.ckpt: its record of the data file of --data.path is damaged"):
            check_resumed_data({"path": "x.csv"}, checkpoint, "last.ckpt")
