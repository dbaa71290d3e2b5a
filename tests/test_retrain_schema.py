"""The schema check of retraining (``pipelines/retrain_schema.py``, ``DomainSpec.schema_options``) on a domain
whose schema is channels, targets and a task: a real autonomous champion, then data with other channels."""

from __future__ import annotations

from pipelines.domain_registry import get_domain
from pipelines.model_registry import ModelRegistry
from pipelines.retrain import main as retrain_main
from pipelines.retrain_steps import ExitCode

SPEC = get_domain("autonomous")
TINY = [*SPEC.test_args, "--trainer.max_epochs=1", "--trainer.logger=false"]


def test_other_channels_or_task_are_refused_before_training(tmp_path, capsys):
    command = ["autonomous", "--registry", str(tmp_path / "registry"), "--runs_dir", str(tmp_path / "runs"), *TINY]
    assert retrain_main(command) == ExitCode.PROMOTED
    registry = ModelRegistry(tmp_path / "registry", "autonomous")
    attempts = sorted(p.name for p in (tmp_path / "runs" / "autonomous").iterdir())
    capsys.readouterr()
    assert retrain_main([*command, "--data.channels=[speed,yaw_rate,accel_long]", "--data.sim_seed=1"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "channel_names: champion ['speed', 'yaw_rate', 'accel_long', 'accel_lat']" in err and "(missing here: ['accel_lat'])" in err, err[-3000:]
    assert retrain_main([*command, "--data.task=classification", "--data.target_column=manoeuvre", "--data.sim_seed=1"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "task: champion 'forecasting', this data 'classification'" in err, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "autonomous").iterdir()) == attempts, "nothing was trained"
    assert registry.versions() == ["v0001"] and registry.champion() == "v0001"
    assert [row["exit_code"] for row in registry.history()] == [0, 2, 2]
