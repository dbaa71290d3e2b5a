"""The sweep's pruners wait ``--pruner_warmup`` validation runs: an early epoch's score is mostly noise, and a pruner
acting on it keeps whichever trial started luckily (the first BreastMNIST sweep pruned 15 of 20 trials after one epoch)."""

from __future__ import annotations

import optuna

from pipelines.sweep import PRUNER_WARMUP as SHOWN_IN_HELP
from pipelines.sweep_trial import PRUNER_WARMUP, make_pruner


def first_pruned_step(pruner: optuna.pruners.BasePruner, steps: int = 10) -> int | None:
    """Five good trials (0.9 at every validation run), then a bad one (0.1): the first step it is pruned at."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        for step in range(1, steps + 1):
            trial.report(0.9, step)
        study.tell(trial, 0.9)
    bad = study.ask()
    for step in range(1, steps + 1):
        bad.report(0.1, step)
        if bad.should_prune():
            return step
    return None


def test_median_pruner_waits_its_warmup_then_prunes_a_bad_trial():
    assert SHOWN_IN_HELP == PRUNER_WARMUP == 5
    assert first_pruned_step(make_pruner("median")) == PRUNER_WARMUP
    assert first_pruned_step(make_pruner("median", 2)) == 2
    assert first_pruned_step(make_pruner("median", 0)) == 1  # --pruner_warmup 0: the old behaviour, on request
    assert first_pruned_step(make_pruner("none")) is None


def test_hyperband_never_prunes_before_the_warmup():
    step = first_pruned_step(make_pruner("hyperband"), steps=40)
    assert step is None or step > PRUNER_WARMUP


def test_negative_warmup_is_refused(tmp_path, capsys):
    from pipelines.sweep import main

    space = tmp_path / "space.yaml"
    space.write_text("model.lr: {low: 0.0001, high: 0.01, log: true}\n")
    code = main(["finance", "--space", str(space), "--trials", "1", "--pruner_warmup", "-1", "--sweeps_dir", str(tmp_path / "s")])
    assert code == 2 and "--pruner_warmup must be 0 or more validation runs, got -1" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "s").exists()
