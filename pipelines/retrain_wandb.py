"""Each retraining decision as a W&B run: the retraining history the dashboard plots (:mod:`pipelines.dashboard`).

After an attempt that trained a challenger is recorded in the registry's ``history.jsonl`` (the
source of truth), :func:`log_decision` logs it as one W&B run of the attempt's group (``retrain-<domain>``
or ``--wandb_group``), job type ``retrain-decision``, id ``<attempt>-decision``, in the attempt's run
folder (``<run folder>/decision/wandb``), offline unless a key is present (:func:`pipelines.tracking.wandb_mode`, passed to ``wandb.init``). Its
numbers have stable names (:data:`DECISION_KEYS`, the dashboard's "Retraining history" panels):

- ``retrain/challenger_score``: the challenger's selection metric (``retrain/metric``, e.g. ``test/auroc``) on the registry's evaluation set;
- ``retrain/champion_score``: the champion's, re-scored on the same set in the same attempt (absent when there was no champion);
- ``retrain/promoted``, ``retrain/rejected``, ``retrain/failed``: 1 for the attempt's decision, 0 for the others;
- ``retrain/margin``: the margin the challenger had to beat; ``retrain/version``: the number of the registered version (``v0003``: 3).

The words go to the run's summary and config: ``retrain/decision``, ``retrain/reason`` (the decision's
sentence, or the failure), ``retrain/metric``, ``retrain/version_name``, the champion's version and the exit code.
Attempts that trained nothing (nothing new, locked, bad options) are not logged: they are history rows only.

A failure of W&B (unreachable, a rejected key, a full disk) never changes or hides the decision: it is
already recorded, the failure is one warning line on stderr, and the attempt's exit code stands.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

DECISIONS = ("promoted", "rejected", "failed")
SCORE_KEYS = ("retrain/challenger_score", "retrain/champion_score")
OUTCOME_KEYS = tuple(f"retrain/{decision}" for decision in DECISIONS)
VERSION_KEY = "retrain/version"
DECISION_KEYS = (*SCORE_KEYS, *OUTCOME_KEYS, "retrain/margin", VERSION_KEY)
JOB_TYPE = "retrain-decision"


def decision_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of one history row (``pipelines.retrain_attempt.Attempt.row``), under :data:`DECISION_KEYS`."""
    decision = row.get("decision")
    metrics: dict[str, float] = {f"retrain/{name}": float(decision == name) for name in DECISIONS}
    challenger, champion = row.get("challenger") or {}, row.get("champion") or {}
    for key, found in zip(SCORE_KEYS, (challenger.get("score"), champion.get("score"))):
        if isinstance(found, (int, float)):
            metrics[key] = float(found)
    if isinstance(row.get("margin"), (int, float)):
        metrics["retrain/margin"] = float(row["margin"])
    version = str(challenger.get("version") or "")
    if version[1:].isdigit():
        metrics[VERSION_KEY] = float(int(version[1:]))
    return metrics


def decision_summary(row: dict[str, Any]) -> dict[str, Any]:
    """The words of the decision (run summary and config)."""
    return {
        "retrain/decision": row.get("decision"), "retrain/reason": row.get("reason") or row.get("error"), "retrain/metric": row.get("metric"),
        "retrain/version_name": (row.get("challenger") or {}).get("version"), "retrain/champion_version": (row.get("champion") or {}).get("version"),
        "retrain/exit_code": row.get("exit_code"), "retrain/attempt": row.get("attempt"),
    }  # fmt: skip


def log_decision(row: dict[str, Any], group: str) -> str:
    """Log one recorded attempt as a W&B run; return what happened, in words. Never raises (module docstring)."""
    from pipelines.tracking import wandb_mode

    if row.get("decision") not in DECISIONS or not row.get("run_dir"):
        return "decision not logged to W&B (the attempt trained nothing)"
    mode = wandb_mode()
    if mode == "disabled":
        return "decision not logged to W&B (WANDB_MODE=disabled)"
    try:
        import wandb

        folder = Path(row["run_dir"]) / "decision"  # beside, not among, the training run's W&B files
        folder.mkdir(parents=True, exist_ok=True)
        summary = decision_summary(row)
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", f"domain-pipelines-{row['domain']}"), id=f"{row['attempt']}-decision", name=f"{row['attempt']}-decision",
            job_type=JOB_TYPE, group=group, mode=mode, dir=str(folder), config=summary, tags=[str(row["decision"])], resume="allow",
            reinit="finish_previous", settings=wandb.Settings(init_timeout=30),
        )  # fmt: skip
        try:
            run.log(decision_metrics(row))
            run.summary.update({k: v for k, v in summary.items() if v is not None})
        finally:
            run.finish()
        return f"decision logged to W&B ({mode}, run {run.id})"
    except Exception as error:  # noqa: BLE001 - W&B is a mirror: the registry's history holds the decision
        message = f"W&B failed ({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''})"
        print(f"[retrain] warning: decision not logged to W&B: {message}; it is recorded in the registry's history.jsonl", file=sys.stderr)
        return f"decision not logged to W&B: {message}"
