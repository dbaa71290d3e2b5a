"""How a sweep (:mod:`pipelines.sweep`) counts its study's trials, and how many more it starts.

A trial's ``outcome`` user attribute says what it was: ``complete``, ``pruned`` or ``failed`` (a
finished trial, counted towards ``--trials``), ``stopped`` (stopped by SIGTERM/SIGINT; its retry is
queued). A FAIL trial without one was lost with its worker (its heartbeat fell silent): Optuna's
``RetryHeartbeatStaleTrialCallback`` queued a retry with the same parameters, a WAITING trial.
"""

from __future__ import annotations

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
