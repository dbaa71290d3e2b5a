"""What ``python -m pipelines.monitor ... --wandb`` logs to W&B: drift scores, the alert rate against the budget, serving figures of the window.

One W&B run per check (job type ``monitor``, group ``monitor-<domain>``, the domain's project
``domain-pipelines-<domain>`` or ``$WANDB_PROJECT``), offline unless a key is present
(:func:`pipelines.tracking.wandb_mode`, passed to ``wandb.init``). The same numbers are written under ``"logged"`` in
the monitor's ``--json`` file. The keys (the dashboard's "Drift scores" and "Serving metrics" panels
name them: :mod:`pipelines.dashboard`):

- ``drift/features``, ``drift/drifted_features``, ``drift/max_psi``, ``drift/min_ks_pvalue``, ``drift/psi/<feature>``;
- ``alert_budget/rate``, ``alert_budget/live_rate``, ``alert_budget/low``, ``alert_budget/high``, ``alert_budget/outside`` (a model with a budget);
- ``serving/window_rows``, ``serving/rows_per_minute`` (a request log's time span), ``serving/score_mean``,
  ``serving/alert_share`` (the window's ``is_alert`` share) when the window holds them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pandas as pd

from pipelines.drift import FeatureDrift
from pipelines.monitor_budget import BudgetCheck

DRIFT_KEYS = ("drift/features", "drift/drifted_features", "drift/max_psi", "drift/min_ks_pvalue")
BUDGET_KEYS = ("alert_budget/rate", "alert_budget/live_rate", "alert_budget/low", "alert_budget/high", "alert_budget/outside")
SERVING_KEYS = ("serving/window_rows", "serving/rows_per_minute", "serving/score_mean", "serving/alert_share")


def _column(window: pd.DataFrame, names: tuple[str, ...]) -> np.ndarray | None:
    for name in names:
        if name in window.columns:
            values = pd.to_numeric(window[name], errors="coerce").to_numpy(dtype=np.float64)
            values = values[np.isfinite(values)]
            return values if len(values) else None
    return None


def monitor_metrics(results: list[FeatureDrift], alert_rate: BudgetCheck | None, window: pd.DataFrame) -> dict[str, float]:
    """The numbers one monitor check logs (module docstring), from its results and its window."""
    metrics: dict[str, float] = {"serving/window_rows": float(len(window))}
    if results:
        metrics.update({
            "drift/features": float(len(results)), "drift/drifted_features": float(sum(r.drifted for r in results)),
            "drift/max_psi": max(r.psi for r in results), "drift/min_ks_pvalue": min(r.ks_pvalue for r in results),
            **{f"drift/psi/{r.feature}": r.psi for r in results},
        })  # fmt: skip
    if alert_rate is not None:
        metrics.update({
            "alert_budget/rate": alert_rate.rate, "alert_budget/live_rate": alert_rate.live_rate,
            "alert_budget/low": alert_rate.interval[0], "alert_budget/high": alert_rate.interval[1], "alert_budget/outside": float(alert_rate.outside),
        })  # fmt: skip
    if "time" in window.columns and len(window) > 1:
        times = pd.to_datetime(window["time"], errors="coerce", utc=True, format="ISO8601").dropna()
        minutes = (times.max() - times.min()).total_seconds() / 60 if len(times) > 1 else 0.0
        if minutes > 0:
            metrics["serving/rows_per_minute"] = len(times) / minutes
    scores, alerts = _column(window, ("output.score", "score")), _column(window, ("output.is_alert", "is_alert"))
    if scores is not None:
        metrics["serving/score_mean"] = float(scores.mean())
    if alerts is not None:
        metrics["serving/alert_share"] = float(alerts.mean())
    return {k: float(v) for k, v in metrics.items()}


def log_to_wandb(metrics: dict[str, float], domain: str, facts: dict[str, Any]) -> str:
    """Log one check as a W&B run; return its mode and id (a failure is reported, never raised: the report is what counts)."""
    from pipelines.tracking import wandb_mode

    mode = wandb_mode()
    try:
        import wandb

        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", f"domain-pipelines-{domain}"), job_type="monitor", group=f"monitor-{domain}", mode=mode,
            name=f"monitor-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}", config={k: v for k, v in facts.items() if k != "alert_budget"},
            reinit="finish_previous", settings=wandb.Settings(init_timeout=30),
            dir=os.environ.get("WANDB_DIR") or None,  # read at each call: W&B's process-wide settings keep the first run's folder
        )  # fmt: skip
        run.log(metrics)
        run_id = run.id
        run.finish()
        return f"logged to W&B ({mode}, run {run_id})"
    except Exception as error:  # noqa: BLE001 - W&B unreachable: the check's exit code and files stand
        return f"not logged to W&B ({type(error).__name__}: {error})"
