"""Messages the new-user trial found unclear (notes/trial3-report.md, finding 7 and 8): each is now one
paragraph with exit 2 and a did-you-mean like the rest of the command line. All in this process."""

from __future__ import annotations

import pytest

from pipelines.registry_cli import main as registry_main
from tests.conftest import run_pipeline


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["finanse", "list"], "unknown domain 'finanse' (did you mean 'finance'?)"),
        (["finance", "lsit"], "unknown command 'lsit' (did you mean 'list'?)"),
        (["finance", "show", "v0009"], "no version or alias 'v0009'"),
        (["finance", "promote", "v0007"], "no version or alias 'v0007'"),
        (["finance", "alias", "set", "staging", "v0042"], "no version or alias 'v0042'"),
        (["finance", "alias", "rm", "nosuch"], "no alias 'nosuch'"),
    ],
    ids=["domain", "command", "show", "promote", "alias-set", "alias-rm"],
)
def test_registry_usage_errors_exit_2_with_a_did_you_mean(argv, expected, tmp_path, capsys):
    (tmp_path / "finance").mkdir()  # an empty registry: no versions, no aliases
    assert registry_main([*argv, "--registry", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err  # one line, no usage dump


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("--model.threshold_method=sensitivty", "--model.threshold_method sensitivty: expected one of fixed, sensitivity, specificity, cost (did you mean 'sensitivity'?)"),
        ("--model.cost_fp=nan", "--model.cost_fp nan: expected a finite number"),
    ],
    ids=["literal", "nan"],
)
def test_a_misspelt_choice_gets_the_choices_and_a_did_you_mean(option, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        run_pipeline("healthcare", option)
    assert stop.value.code == 2
    assert expected in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("where", ["comment", "folder"])
def test_another_domains_config_names_the_domain_it_belongs_to(where, tmp_path, capsys):
    folder = tmp_path / "sweeps" / "finance" / "study" if where == "folder" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "best.yaml"
    config.write_text(("# domain: finance\n" if where == "comment" else "") + "model:\n  threshold_method: auto\n  cost_fn: 5.0\n")
    with pytest.raises(SystemExit) as stop:
        run_pipeline("healthcare", "--config", str(config), "--runs_dir", str(tmp_path / "runs"))
    assert stop.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--config {config}: this config was written for the finance domain" in err and f"python -m pipelines.run finance --config {config}" in err, err
    assert not (tmp_path / "runs").exists()


def test_a_waiting_retry_in_trials_csv_shows_nothing_of_the_stopped_trial(tmp_path):
    import optuna
    import pandas as pd

    from pipelines.sweep_report import write_trials_csv

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    for name, value in {"outcome": "stopped", "exit_code": 143, "run_dir": "runs/finance/s-t0000", "error": "stopped by SIGTERM"}.items():
        trial.set_user_attr(name, value)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study.trials[0])  # what the sweep does with a stopped trial
    rows = pd.read_csv(write_trials_csv(study, tmp_path)).set_index("number")
    assert list(rows["state"]) == ["FAIL", "WAITING"]
    assert rows.loc[0, "user_attrs_outcome"] == "stopped" and rows.loc[0, "user_attrs_exit_code"] == 143
    assert rows.loc[1, ["user_attrs_outcome", "user_attrs_exit_code", "user_attrs_run_dir", "user_attrs_error"]].isna().all()


def test_a_refused_sweep_resume_leaves_no_empty_sweep_folder(tmp_path, capsys):
    import optuna
    import yaml

    from pipelines.sweep import main as sweep_main

    storage = f"sqlite:///{tmp_path / 'finance-study.db'}"
    study = optuna.create_study(study_name="sig", storage=storage)
    study.set_user_attr("domain", "finance")  # a finance sweep's study
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"model.lr": {"low": 0.0005, "high": 0.005, "log": True}}))
    code = sweep_main(["healthcare", f"--space={space}", "--trials=1", "--name=sig", f"--storage={storage}", f"--sweeps_dir={tmp_path / 'sweeps'}",
                       f"--runs_dir={tmp_path / 'runs'}", "--no_wandb"])  # fmt: skip
    assert code == 2 and "was started with domain 'finance'" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "sweeps" / "healthcare" / "sig").exists()


def test_evaluating_or_predicting_without_a_checkpoint_uses_the_runs_best_or_is_refused(tiny_run, tmp_path, capsys):
    """``test``/``predict`` without ``--ckpt_path`` scored an untrained model, exit 0 (and ``test`` replaced the run's recorded
    test metrics with its: trial finding). Now the run's best.ckpt is used and said; with no checkpoint at all, or
    ``--ckpt_path last`` where there is none, exit 2 before anything is written."""
    import json

    from tests.conftest import copy_run

    runs = tmp_path / "runs"
    run = copy_run(tiny_run("finance"), runs)
    common = ("--run_id", run.name, "--runs_dir", str(runs), "--trainer.logger=false", "--trainer.limit_test_batches=2")
    run_pipeline("finance", "test", *common, "--ckpt_path", "best")
    recorded = json.loads((run / "summary.json").read_text())["test"]
    capsys.readouterr()
    run_pipeline("finance", "test", *common)
    err = capsys.readouterr().err
    assert f"test: no --ckpt_path given: using {run / 'checkpoints' / 'best.ckpt'}" in err, err[-3000:]
    assert json.loads((run / "summary.json").read_text())["test"] == recorded, "the trained model's test, not an untrained one's"
    for argv in (["predict", "--runs_dir", str(tmp_path / "none")], ["test", "--runs_dir", str(tmp_path / "none"), "--ckpt_path", "last"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            run_pipeline("finance", *argv)
        err = " ".join(capsys.readouterr().err.split())
        assert stop.value.code == 2 and "needs trained weights" in err and "untrained model" in err, err
        assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(("variable", "expected"), [
    ("PIPELINES_FIT__DATA__BATCHSIZE", "(did you mean 'PIPELINES_FIT__DATA__BATCH_SIZE'"),
    ("PIPELINES_FIT__TRAINER__MAX_EPOCH", "(did you mean 'PIPELINES_FIT__TRAINER__MAX_EPOCHS'"),
], ids=["batchsize", "max_epoch"])
def test_a_misspelt_environment_variable_is_refused_like_a_misspelt_key(variable, expected, tmp_path, monkeypatch, capsys):
    """A misspelt ``PIPELINES_*`` variable was ignored in silence (trial finding: a job's ..._MAX_EPOCH=1 trained 15 epochs)."""
    monkeypatch.setenv(variable, "1")
    with pytest.raises(SystemExit) as stop:
        run_pipeline("finance", "--runs_dir", str(tmp_path / "runs"))
    err = " ".join(capsys.readouterr().err.split())
    assert stop.value.code == 2 and f"environment variable {variable} names no option" in err and expected in err, err
    assert not (tmp_path / "runs").exists()


def test_a_one_dash_option_is_named_not_read_as_a_config_file(tmp_path, capsys):
    """``-ckpt_path best`` was read as ``-c kpt_path`` ("File does not exist: .../kpt_path": trial finding)."""
    with pytest.raises(SystemExit) as stop:
        run_pipeline("finance", "predict", "-ckpt_path", "best", "--runs_dir", str(tmp_path / "runs"))
    err = " ".join(capsys.readouterr().err.split())
    assert stop.value.code == 2 and "-ckpt_path: options take two dashes (did you mean '--ckpt_path'?)" in err, err
    assert not (tmp_path / "runs").exists()
