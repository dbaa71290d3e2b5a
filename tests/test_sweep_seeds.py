"""A sweep's sampler on a continued study, and a grid's size (pipelines/sweep_counts.py), with real Optuna studies in SQLite.

Trial findings: a seeded study run again (continued in the same storage) re-created its sampler with the same seed and
proposed the points of its first command again; a grid sweep asked for more trials than the grid has points repeated
points silently.
"""

from __future__ import annotations

import pytest

optuna = pytest.importorskip("optuna")

from pipelines.sweep import Sweep, build_parser, main as sweep_main  # noqa: E402
from tests.test_sweep import TINY, write_space  # noqa: E402


def test_a_seeded_study_run_again_proposes_new_points(tmp_path, capsys):
    space = write_space(tmp_path, "space", {"model.lr": {"low": 1.0e-4, "high": 1.0e-1, "log": True}, "model.latent_dim": {"low": 2, "high": 64}})
    argv = ["finance", f"--space={space}", "--trials=4", "--seed=3", f"--sweeps_dir={tmp_path / 'sweeps'}", f"--runs_dir={tmp_path / 'runs'}", *TINY]

    def first_two_points() -> list[dict]:
        """What a sweep command started now would run first: two trials asked of its sampler (and told, as a run would)."""
        options, runner_args = build_parser().parse_known_args(argv)
        study = Sweep(options, runner_args).study
        points = []
        for _ in range(2):
            trial = study.ask()
            points.append({"model.lr": trial.suggest_float("model.lr", 1.0e-4, 1.0e-1, log=True), "model.latent_dim": trial.suggest_int("model.latent_dim", 2, 64)})
            study.tell(trial, 1.0)
        return points

    first = first_two_points()
    again = first_two_points()  # the same command on the same study: seed 3 + its 2 trials
    assert not any(point in first for point in again), f"the continued study proposed its first command's points again: {first} then {again}"
    assert "sampler seed 3 + 2 = 5" in capsys.readouterr().err


def test_a_grid_sweep_for_more_trials_than_points_is_refused_before_anything_runs(tmp_path, capsys):
    space = write_space(tmp_path, "grid", {"data.batch_size": {"choices": [32, 64]}, "model.latent_dim": {"choices": [2, 4]}})
    code = sweep_main(["finance", f"--space={space}", "--trials=5", "--sampler=grid", f"--sweeps_dir={tmp_path / 'sweeps'}", f"--runs_dir={tmp_path / 'runs'}", *TINY])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err, err
    assert f"--trials 5 with --sampler grid: the grid of {space} has 4 points (data.batch_size: 2 choices x model.latent_dim: 2 choices)" in err, err
    assert "give --trials 4 or fewer" in err, err
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "runs").exists()
