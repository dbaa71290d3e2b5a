"""Alert budgets on production traffic: the live alert rate of a window against a model's budget, and its recalibration.

A model with an **alert budget** (finance: ``target_alert_rate``, e.g. 0.5 % of transactions, and the
``budget_threshold`` score that flags that share) carries where that threshold was fitted under
``KEY`` (``"alert_budget"``) in its checkpoint and in its bundle's ``metadata.json``::

    {"fitted_on": "validation rows labelled normal", "rows": 5482, "rate": 0.005, "threshold": 9.8, ...}

At training the threshold is fitted on the validation rows labelled normal (all validation rows when
there are no labels): a semi-supervised validation split holds a large share of the fraud, so fitted on
all of it the budget flagged far less than its share of real traffic (0.2 % instead of 0.5 %).

- :func:`check_budget`: the window's alert rate (``score >= budget_threshold``) against the budget:
  if the threshold flagged exactly the budget's share of such traffic, the alert count of ``n`` rows
  would fall in the binomial interval ``binom.interval(1 - alpha, n, rate)`` with probability at
  least ``1 - alpha``; a count outside it is flagged (``python -m pipelines.monitor`` exits 3, as for
  drift). The threshold is a fixed number here: the test is whether *it* meets the budget on this
  traffic. A threshold fitted on ``m`` rows (the ``k = ceil(rate m)``-th highest score) misses the
  budget by its own sampling error even on unchanged traffic (its true share is ``Beta(k, m - k + 1)``):
  ``fit_spread`` reports that range, and a recalibration should use a window at least as large as
  the windows it is then checked on.
- :func:`recalibrate`: a copy of the checkpoint or bundle (written to a new path, complete or absent;
  the original is never touched) whose budget threshold is the ``rate`` quantile of the window's scores
  (unlabelled recent traffic the same model scored), with ``fitted_on: "window"``. No retraining.

Example::

    >>> top_share_threshold([1.0, 5.0, 3.0, 2.0], 0.5)
    3.0
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.errors import InputError
from pipelines.request_log import version_problem

KEY = "alert_budget"
ALPHA = 0.01
#: the fewest alerts at the budget a window must hold for its quantile to be a threshold worth serving
MIN_ALERTS_TO_FIT = 10
SCORE_COLUMNS = ("output.score", "score")


def top_share_threshold(scores: Any, share: float) -> float:
    """The score at or above which ``share`` of ``scores`` fall (at least one of them)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    k = min(len(ordered), max(1, math.ceil(share * len(ordered))))
    return float(ordered[k - 1])


def fit_record(fitted_on: str, rows: int, rate: float, threshold: float, **extra: Any) -> dict[str, Any]:
    """What a budget threshold was fitted on, as saved under ``KEY``."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"fitted_on": fitted_on, "rows": int(rows), "rate": float(rate), "threshold": float(threshold), "written_at": stamp, **extra}


@dataclass(frozen=True)
class Budget:
    """A model's alert budget: the share of rows it may flag, the score that flags them, and where that score was fitted."""

    path: str
    kind: str  # "checkpoint" or "bundle"
    rate: float
    threshold: float
    record: dict[str, Any] | None
    alerts_at_budget: bool  # is_alert uses the budget threshold (then it is inside a bundle's model file too)
    version: str | None  # the bundle's served version (pipelines.serving_server.model_identity); None for a checkpoint

    @property
    def fitted_rows(self) -> int | None:
        return int(self.record["rows"]) if self.record and self.record.get("rows") else None

    @property
    def fitted_on(self) -> str:
        return self.record["fitted_on"] if self.record else "the validation split (recorded only since alert budgets are recorded)"


def read_budget(path: str | Path) -> Budget | None:
    """The alert budget of a checkpoint (``.ckpt``, weights-only) or bundle folder; ``None`` when the model has none."""
    path = Path(path)
    if path.is_dir():
        if not (path / "metadata.json").is_file():
            raise InputError(f"{path}: not a bundle (no metadata.json)")
        metadata = json.loads((path / "metadata.json").read_text())
        domain = metadata.get("domain_metadata") or {}
        rate, threshold = domain.get("target_alert_rate"), domain.get("budget_threshold")
        if rate is None or threshold is None:
            return None
        from pipelines.serving_server import model_identity

        alerts = domain.get("threshold_method") == "alert_rate" or domain.get("threshold") == threshold
        return Budget(str(path), "bundle", float(rate), float(threshold), metadata.get(KEY), alerts, model_identity(metadata)["version"])
    from pipelines.checkpoints import read_checkpoint

    checkpoint = read_checkpoint(path)
    state, hparams = checkpoint["state_dict"], checkpoint.get("hyper_parameters") or {}
    if "budget_threshold" not in state or "target_alert_rate" not in hparams:
        return None
    threshold = float(state["budget_threshold"])
    if not math.isfinite(threshold):
        return None
    alerts = hparams.get("threshold_method") == "alert_rate" or float(state.get("threshold", math.nan)) == threshold
    return Budget(str(path), "checkpoint", float(hparams["target_alert_rate"]), threshold, checkpoint.get(KEY), alerts, None)


def window_scores(window: pd.DataFrame, name: str) -> tuple[np.ndarray, int] | None:
    """The window's model scores (the request log's ``output.score``, a table's ``score``) and how many were missing; ``None`` without such a column."""
    column = next((c for c in SCORE_COLUMNS if c in window.columns), None)
    if column is None:
        return None
    values = pd.to_numeric(window[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(np.isnan(values) & window[column].notna().to_numpy())
    if len(bad):
        raise InputError(f"{name}: column {column!r} should hold the model's scores (numbers) but row {bad[0] + 1} holds {window[column].iloc[bad[0]]!r}")
    if np.isinf(values).any():
        raise InputError(f"{name}: column {column!r} holds inf at row {np.flatnonzero(np.isinf(values))[0] + 1}; expected finite scores")
    kept = values[np.isfinite(values)]
    return kept, int(len(values) - len(kept))


@dataclass(frozen=True)
class BudgetCheck:
    rate: float
    threshold: float
    fitted_on: str
    fitted_rows: int | None
    fit_spread: tuple[float, float] | None  # where a threshold fitted on fitted_rows rows lands, 1 - alpha of the time
    rows: int
    missing_scores: int
    alerts: int
    live_rate: float
    interval: tuple[float, float]
    alpha: float
    outside: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        low, high = self.interval
        verdict = "OUTSIDE the interval" if self.outside else "within the interval"
        spread = f"; a threshold fitted on {self.fitted_rows} rows flags {100 * self.fit_spread[0]:.3g}-{100 * self.fit_spread[1]:.3g} % of unchanged traffic" if self.fit_spread else ""
        return (f"alert budget {100 * self.rate:.3g} % (threshold {self.threshold:.6g}, fitted on {self.fitted_on}): live {100 * self.live_rate:.3g} % "
                f"({self.alerts} of {self.rows} rows); {100 * (1 - self.alpha):g} % binomial interval {100 * low:.3g}-{100 * high:.3g} %: {verdict}{spread}")  # fmt: skip


def alert_count_interval(rows: int, rate: float, alpha: float) -> tuple[int, int]:
    """The alert counts of ``rows`` rows expected with probability ``1 - alpha`` when the true share is ``rate``."""
    from scipy.stats import binom

    low, high = binom.interval(1 - alpha, rows, rate)
    return int(low), int(high)


def fit_spread(fitted_rows: int, rate: float, alpha: float) -> tuple[float, float]:
    """The share of unchanged traffic a threshold fitted on ``fitted_rows`` rows flags, ``1 - alpha`` of the time: ``Beta(k, m - k + 1)``."""
    from scipy.stats import beta

    k = min(fitted_rows, max(1, math.ceil(rate * fitted_rows)))
    low, high = beta.interval(1 - alpha, k, fitted_rows - k + 1)
    return float(low), float(high)


def check_budget(scores: np.ndarray, budget: Budget, threshold: float | None = None, alpha: float = ALPHA, missing: int = 0,
                 fitted_rows: int | None = None, fitted_on: str | None = None) -> BudgetCheck:  # fmt: skip
    """The share of ``scores`` at or above ``budget``'s threshold (or ``threshold``, fitted on ``fitted_rows`` rows) against its rate."""
    rows = len(scores)
    if rows == 0:
        raise InputError(f"the window has no scores ({missing} missing); expected the model's score per row")
    threshold = budget.threshold if threshold is None else threshold
    fitted_rows = budget.fitted_rows if fitted_on is None else fitted_rows
    alerts = int(np.count_nonzero(np.asarray(scores) >= threshold))
    low, high = alert_count_interval(rows, budget.rate, alpha)
    spread = fit_spread(fitted_rows, budget.rate, alpha) if fitted_rows else None
    return BudgetCheck(budget.rate, threshold, fitted_on or budget.fitted_on, fitted_rows, spread, rows, missing, alerts, alerts / rows,
                       (low / rows, high / rows), alpha, bool(alerts < low or alerts > high))  # fmt: skip


def check_versions(budget: Budget, window: pd.DataFrame, name: str, chosen: str | None) -> None:
    """Refuse a request-log window whose scores are not (all) this model's: several versions without ``--model_version``,
    or, for a bundle, none of its served version."""
    problem = version_problem(window, budget.version, chosen)
    if problem is None:
        return
    kind, versions = problem
    if kind == "several":
        raise InputError(f"{name}: the window holds the scores of several model versions {versions}; pick the one {budget.path} is with --model_version")
    raise InputError(f"{name}: the window's scores come from model version {versions}, not from {budget.path} (version {budget.version!r}); "
                     "recalibrate the model that scored them, or pick its records with --model_version")  # fmt: skip


def recalibrate(budget: Budget, scores: np.ndarray, out: str | Path, source: str) -> tuple[Path, dict[str, Any]]:
    """Write ``out``: ``budget``'s checkpoint or bundle with the budget threshold refitted on ``scores`` (complete or absent)."""
    out = Path(out)
    needed = math.ceil(MIN_ALERTS_TO_FIT / budget.rate)
    if len(scores) < needed:
        raise InputError(f"{source}: {len(scores)} scored rows; at a {100 * budget.rate:g} % budget a threshold needs at least {needed} rows "
                         f"({MIN_ALERTS_TO_FIT} alerts) to be fitted; use a longer window")  # fmt: skip
    if out.exists() or out.is_symlink():
        raise InputError(f"--recalibrate_budget {out}: already exists; the recalibrated model goes to a new path (an earlier model is never overwritten)")
    if not out.resolve().parent.is_dir():
        raise InputError(f"--recalibrate_budget {out}: the folder {out.resolve().parent} does not exist")
    if budget.kind == "bundle" and budget.alerts_at_budget:
        raise InputError(f"{budget.path}: this bundle's is_alert uses the budget threshold, which is inside its model file; recalibrate the "
                         "checkpoint it was exported from (a .ckpt) and export that")  # fmt: skip
    threshold = top_share_threshold(scores, budget.rate)
    record = fit_record("window", len(scores), budget.rate, threshold, window=source, previous_threshold=budget.threshold,
                        previous_fitted_on=budget.fitted_on, recalibrated_from=budget.path)  # fmt: skip
    if budget.kind == "bundle":
        _write_bundle(Path(budget.path), out, threshold, record)
    else:
        _write_checkpoint(Path(budget.path), out, threshold, record, budget.alerts_at_budget)
    return out, record


def _write_checkpoint(source: Path, out: Path, threshold: float, record: dict[str, Any], alerts_at_budget: bool) -> None:
    import torch

    from pipelines.files import atomic_write

    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    names = ["budget_threshold", *(["threshold"] if alerts_at_budget else [])]  # is_alert follows a budget it is made of
    for name in names:
        state[name] = torch.tensor(threshold, dtype=state[name].dtype)
    checkpoint[KEY] = {**record, "updated": names}
    atomic_write(out, lambda path: torch.save(checkpoint, path))


def _write_bundle(source: Path, out: Path, threshold: float, record: dict[str, Any]) -> None:
    from pipelines.serving_server import model_identity

    staging = out.resolve().parent / f".{out.name}.{secrets.token_hex(6)}"  # named before it exists: a SIGTERM inside mkdtemp left it
    try:
        staging.mkdir(mode=0o700)  # FileExistsError: another writer's (48 random bits), and the finally below is not reached
    except BaseException as error:
        if not isinstance(error, FileExistsError):
            shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        metadata = json.loads((staging / "metadata.json").read_text())
        version = model_identity(metadata)["version"]
        metadata["domain_metadata"]["budget_threshold"] = threshold
        metadata[KEY] = {**record, "updated": ["budget_threshold"]}
        metadata["model_version"] = f"{version}+budget-{record['written_at'].replace(':', '').replace('-', '')}"[:128]
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it 0700; the copied files keep the bundle's modes (export makes them readable)
        os.replace(staging, out)  # out does not exist (checked): a rename, complete or absent
    finally:
        shutil.rmtree(staging, ignore_errors=True)
