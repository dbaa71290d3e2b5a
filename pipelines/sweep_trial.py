"""What runs inside one trial's process of a sweep (:mod:`pipelines.sweep`).

A trial runs as ``python -m pipelines.child_run --parent=PID DOMAIN [runner options]``
(:mod:`pipelines.child_run`): it dies with the sweep process that started it, so a SIGKILLed sweep
leaves no orphaned training behind, and its running trial is failed by Optuna's heartbeat and
retried when the sweep is started again.

:class:`OptunaPruning` is the Lightning callback the sweep adds to a trial's runner command
(``--trainer.callbacks+=pipelines.sweep_trial.OptunaPruning --trainer.callbacks.storage=...``): it
opens the study by its storage URL, reports the domain's monitored metric after every validation
run (step = number of validation runs, so trials with different batch sizes compare at the same
step) and, when the study's pruner says so, stops training gracefully (``trainer.should_stop``)
and records ``pruned_at`` on the trial. The run then ends like any early-stopped run (exit 0, a
complete run folder) and the sweep records the trial as PRUNED. Under DDP rank zero asks the
study and broadcasts the decision.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

#: Pruners a sweep can use (``--pruner``); ``none`` reports nothing and prunes nothing.
PRUNERS = ("median", "hyperband", "none")


def check_storage_url(url: str) -> None:
    """Refuse a ``--storage`` URL that cannot work before anything is written: not a database URL,
    an unknown database kind, a driver that is not installed (naming what to install), or an SQLite
    file whose folder does not exist. Passwords are not repeated in the message.

    >>> check_storage_url("notaurl")
    Traceback (most recent call last):
    ...
    pipelines.errors.InputError: --storage 'notaurl' is not a database URL; expected e.g. sqlite:///path/to/study.db or postgresql://user:password@host/database
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from pipelines.errors import InputError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InputError(
            f"--storage {url!r} is not a database URL; expected e.g. sqlite:///path/to/study.db or postgresql://user:password@host/database"
        ) from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise InputError(f"--storage {shown}: {parsed.drivername!r} is not a database kind SQLAlchemy knows (sqlite, postgresql, mysql, ...)") from None
    except ImportError as error:
        raise InputError(
            f"--storage {shown}: the database driver is not installed ({error}); install the one the URL names "
            "(postgresql://: `pip install 'psycopg[binary]'`, postgresql+psycopg2://: psycopg2-binary, mysql+pymysql://: pymysql)"
        ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).resolve().parent
        if not folder.is_dir():
            raise InputError(f"--storage {shown}: the folder {folder} of the SQLite file does not exist")


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None) -> Any:
    """Optuna's RDB storage for ``url`` (SQLite, PostgreSQL, MySQL...), a waiting trial claimed by one worker
    only (:class:`pipelines.sweep_storage.SweepStorage`). SQLite waits up to 60 s for a lock held by another
    worker instead of failing at once."""
    import optuna

    from pipelines.sweep_storage import SweepStorage

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3) if heartbeat_interval else None
    return SweepStorage(
        url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
        heartbeat_stale_trial_callback=retry,
    )  # fmt: skip


#: validation runs every trial gets before it can be pruned (``--pruner_warmup``): an early epoch's score is mostly
#: noise (BreastMNIST, 78 validation images: val/auroc 0.46-0.73 after one epoch, whatever the settings), and a
#: pruner acting on it is a random search that keeps whoever started luckily
PRUNER_WARMUP = 5


def make_pruner(name: str, warmup: int = PRUNER_WARMUP) -> Any:
    """The study's pruner: the same settings in the sweep and in every trial's process.

    - ``median``: stop a trial whose value after a validation run is worse than the median of
      earlier trials at that step; never during the first 5 trials, nor before ``warmup`` validation runs.
    - ``hyperband``: successive halving over brackets; the resource is the number of validation runs,
      the smallest bracket ``warmup`` of them.
    """
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup)  # a step < n_warmup_steps is never pruned
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=warmup + 1, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner must be one of {', '.join(PRUNERS)}, got {name!r}")


class OptunaPruning(pl.Callback):
    """Report the monitored metric to an Optuna trial after every validation run; stop when pruned.

    Args:
        storage: the study's storage URL (``sqlite:////abs/study.db``, ``postgresql://...``).
        study: the study's name.
        trial_id: the trial's storage id (not its number).
        monitor: the metric to report (the domain's ``monitor``, e.g. ``val/loss``).
        pruner: one of :data:`PRUNERS`, as the sweep uses.
        pruner_warmup: validation runs before the trial can be pruned, as the sweep uses.
    """

    def __init__(self, storage: str, study: str, trial_id: int, monitor: str, pruner: str = "median", pruner_warmup: int = PRUNER_WARMUP) -> None:
        self.storage_url, self.study_name, self.trial_id = storage, study, trial_id
        self.monitor, self.pruner, self.pruner_warmup = monitor, pruner, pruner_warmup
        self._trial: Any = None
        self._validations = 0

    def _open(self) -> Any:
        if self._trial is None:
            import optuna

            study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage_url), pruner=make_pruner(self.pruner, self.pruner_warmup))
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            value = float(value) if value is not None else math.nan
            if math.isfinite(value):  # a NaN run is stopped by the runner's own guard, not here
                trial = self._open()
                trial.report(value, step=self._validations)
                prune = trial.should_prune()
                if prune:
                    trial.set_user_attr("pruned_at", self._validations)
                    print(f"[sweep] trial pruned after validation run {self._validations} ({self.monitor} = {value:.6g})", file=sys.stderr)
        prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            trainer.should_stop = True
