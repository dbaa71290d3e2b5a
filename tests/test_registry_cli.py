"""The command lines a scheduler runs (``python -m pipelines.registry``, ``python -m pipelines.retrain``): bad
usage and bad input are one line on stderr and exit 2, never a traceback or a usage block, and nothing is written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipelines.model_registry import ModelRegistry
from pipelines.registry_cli import main as registry_main
from pipelines.retrain import main as retrain_main
from tests.conftest import ROOT, child_env
from tests.processes import run_child


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and not lines[0].startswith("usage:"), err
    return lines[0]


def _registry_with_versions(root: Path, count: int) -> ModelRegistry:
    """A registry whose versions hold a tiny real Lightning-style checkpoint (written by the registry's own writer)."""
    import torch

    registry = ModelRegistry(root, "finance")
    checkpoint = root.parent / "tiny.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2, 2)}, "hyper_parameters": {}}, checkpoint)
    with registry.lock():
        for _ in range(count):
            version = registry.add_version(checkpoint, "data: {}\n", {"attempt": "retrain-test"}, None)
            registry.append_history({"decision": "promoted", "challenger": {"version": version}})
    return registry


@pytest.mark.parametrize(
    "args, names",
    [
        (["list", "--bogus"], "--bogus"),
        (["gc", "--keep", "many"], "--keep"),
        (["gc"], "--keep"),
        (["alias", "set", "staging"], "alias set NAME VERSION"),
    ],
)
def test_registry_bad_usage_is_one_line_and_exit_2(tmp_path, capsys, args, names):
    _registry_with_versions(tmp_path / "registry", 1)
    assert registry_main(["finance", *args, "--registry", str(tmp_path / "registry")]) == 2
    assert names in _one_line(capsys.readouterr().err)


def test_registry_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    cli = ["--registry", str(tmp_path / "registry")]
    assert registry_main(["finance", "list", "--registry", str(tmp_path / "nowhere")]) == 2, "a missing registry is bad input"
    assert str(tmp_path / "nowhere" / "finance") in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "nowhere").exists(), "nothing is created"
    registry = _registry_with_versions(tmp_path / "registry", 2)
    assert registry_main(["finance", "rollback", *cli]) == 2, "no champion yet: nothing to roll back to"
    assert "no previous champion" in _one_line(capsys.readouterr().err)
    assert registry_main(["finance", "promote", "v0001", *cli]) == 0
    capsys.readouterr()
    assert registry_main(["finance", "rollback", *cli]) == 2, "a champion without a previous one"
    assert "no previous champion to roll back to (champion: v0001)" in _one_line(capsys.readouterr().err)
    assert registry.champion() == "v0001"
    for args in (["alias", "rm", "staging"], ["show", "stagin"], ["alias", "set", "canary", "v0009"], ["promote", "nightly"]):
        assert registry_main(["finance", *args, *cli]) == 2, args
        assert "no " in _one_line(capsys.readouterr().err)
    assert registry.aliases() == {} and registry.champion() == "v0001"


def test_registry_unknown_option_from_the_shell_is_one_line(tmp_path):
    _registry_with_versions(tmp_path / "registry", 1)
    done = run_child([sys.executable, "-m", "pipelines.registry", "finance", "verify", "--frobnicate", "--registry", str(tmp_path / "registry")], 120, cwd=ROOT, env=child_env())
    assert done.returncode == 2 and "--frobnicate" in _one_line(done.stderr), done.stderr[-2000:]


@pytest.mark.parametrize("args", [["alias", "set", "champion", "v0001"], ["alias", "rm", "champion"], ["alias", "set", "9th", "v0001"]])
def test_an_alias_named_champion_or_malformed_is_a_usage_error_naming_promote_and_rollback(tmp_path, args):
    """``alias set champion VERSION`` exited 1 (a registry error, after taking the lock) although it is a usage error:
    from the shell, one line, exit 2, saying how the champion moves; nothing written (no alias, no history line)."""
    registry = _registry_with_versions(tmp_path / "registry", 1)
    history = (registry.path / "history.jsonl").read_bytes()
    done = run_child([sys.executable, "-m", "pipelines.registry", "finance", *args, "--registry", str(tmp_path / "registry")], 120, cwd=ROOT, env=child_env())
    line = _one_line(done.stderr)
    assert done.returncode == 2 and f"alias {args[2]!r}" in line and "finance promote VERSION" in line and "finance rollback" in line, done.stderr[-2000:]
    assert registry.aliases() == {} and (registry.path / "history.jsonl").read_bytes() == history


@pytest.mark.parametrize("args, names", [(["--margin", "nan"], "--margin"), (["--margin=inf"], "--margin"), (["--margin", "-Infinity"], "--margin"),
                                         (["--keep", "some"], "--keep"), (["--when", "sometimes"], "--when")])  # fmt: skip
def test_retrain_bad_usage_is_one_line_and_exit_2_before_anything_is_written(tmp_path, capsys, args, names):
    assert retrain_main(["finance", "--registry", str(tmp_path / "registry"), *args]) == 2
    assert names in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "registry").exists()


def test_retrain_option_the_runner_rejects_is_one_line_and_exit_2(tmp_path, capsys):
    assert retrain_main(["finance", "--registry", str(tmp_path / "registry"), "--runs_dir", str(tmp_path / "runs"), "--data.no_such_option=1"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("[retrain] usage: the runner rejected the options: error: unrecognized arguments: --data.no_such_option=1"), line
    assert "--help` lists every option" in line, "the runner's whole reason, with its did-you-mean"
    assert not (tmp_path / "runs").exists(), "nothing trained"
