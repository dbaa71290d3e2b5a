"""How a sweep (:mod:`pipelines.sweep`) counts its study's trials, and how many more it starts.

A trial's ``outcome`` user attribute says what it was: ``complete``, ``pruned`` or ``failed`` (a
finished trial, counted towards ``--trials``), ``stopped`` (stopped by SIGTERM/SIGINT; its retry is
queued). A FAIL trial without one was lost with its worker (its heartbeat fell silent): Optuna's
``RetryHeartbeatStaleTrialCallback`` queued a retry with the same parameters, a WAITING trial. The trials a study
already has also reseed a continued seeded study (:func:`sampler_seed`), and a grid's points bound ``--trials``
(:func:`check_grid_size`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

#: What a finished trial was, in its ``outcome`` user attribute (a trial without one was lost with its worker).
COUNTED = ("complete", "pruned", "failed")


def count_trials(trials: Iterable[Any]) -> dict[str, int]:
    """Trials (Optuna ``FrozenTrial``) by outcome: ``complete``, ``pruned``, ``failed`` (their sum is
    ``finished``), ``stopped`` and ``lost`` (failed trials that are retried), ``running`` (here or
    in another sweep command on the same study) and ``waiting`` (retries not yet run)."""
    from optuna.trial import TrialState

    trials = list(trials)
    counts = {outcome: sum(t.user_attrs.get("outcome") == outcome and t.state.is_finished() for t in trials) for outcome in COUNTED}
    counts["running"] = sum(t.state == TrialState.RUNNING for t in trials)
    counts["stopped"] = sum(t.state == TrialState.FAIL and t.user_attrs.get("outcome") == "stopped" for t in trials)
    counts["lost"] = sum(t.state == TrialState.FAIL and t.user_attrs.get("outcome") not in (*COUNTED, "stopped") for t in trials)
    counts["waiting"] = sum(t.state == TrialState.WAITING for t in trials)
    counts["finished"] = sum(counts[o] for o in COUNTED)
    return counts


def trials_to_start(counts: dict[str, int], wanted: int) -> int:
    """How many trials a sweep command should start now, for a study that should have ``wanted``
    finished trials: those it still lacks beyond its finished and running ones (Optuna takes a
    queued retry before it samples a new trial), and at least every retry still waiting. A retry of
    a lost trial is always run, so no sweep ends with a trial left WAITING; and no new trial is
    started for one that is still running elsewhere, which may yet be lost and need its retry.

    Examples (``--trials 2``):
        >>> none = {"finished": 0, "running": 0, "waiting": 0}
        >>> trials_to_start(none, 2), trials_to_start({**none, "running": 1}, 2)
        (2, 1)
        >>> trials_to_start({**none, "running": 1, "waiting": 1}, 2)  # one trial lost, its retry queued
        1
        >>> trials_to_start({**none, "finished": 2, "waiting": 1}, 2), trials_to_start({**none, "finished": 1, "running": 1}, 2)
        (1, 0)
    """
    return max(wanted - counts["finished"] - counts["running"], counts["waiting"], 0)


def existing_trials(storage: Any, name: str) -> int:
    """How many trials (any state) the study ``name`` already has in ``storage``; 0 for a new study."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def sampler_seed(seed: int | None, existing: int) -> int | None:
    """The sampler seed of a sweep command: ``--seed`` plus the trials its study already has. A study continued in the
    same storage (a second command, or the same one run again) would otherwise re-create its sampler in the state of the
    first command and propose the same points again; unseeded, each command draws its own seed.

    >>> sampler_seed(7, 0), sampler_seed(7, 5), sampler_seed(None, 5)
    (7, 12, None)
    """
    return None if seed is None else seed + existing


def check_grid_size(space: Iterable[Any], trials: int, where: str) -> None:
    """Refuse (``InputError``) a grid sweep asked for more trials than its grid has points: Optuna's ``GridSampler``
    proposes visited points again once all are visited, so the extra trials would repeat earlier ones.

    >>> from pipelines.sweep_space import Parameter
    >>> check_grid_size([Parameter("model.lr", choices=(0.1, 0.01)), Parameter("data.batch_size", choices=(64, 128, 256))], 7, "space.yaml")
    Traceback (most recent call last):
    ...
    pipelines.errors.InputError: --trials 7 with --sampler grid: the grid of space.yaml has 6 points (model.lr: 2 choices x data.batch_size: 3 choices), so trials past the 6th would repeat points already tried; give --trials 6 or fewer, or add choices
    """
    from pipelines.errors import InputError

    space = list(space)
    points = math.prod(len(p.choices) for p in space)
    if trials > points:
        sizes = " x ".join(f"{p.option}: {len(p.choices)} choice{'s' if len(p.choices) != 1 else ''}" for p in space)
        raise InputError(f"--trials {trials} with --sampler grid: the grid of {where} has {points} point{'s' if points != 1 else ''} ({sizes}), so trials "
                         f"past the {points}{ordinal(points)} would repeat points already tried; give --trials {points} or fewer, or add choices")  # fmt: skip


def ordinal(number: int) -> str:
    """The English ordinal suffix of ``number`` (1st, 2nd, 3rd, 4th, 11th, 22nd)."""
    return "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
