"""The sweep's Optuna storage (:func:`pipelines.sweep_trial.open_storage`): Optuna's ``RDBStorage``, with
a waiting trial (a queued retry) claimed by one worker only, on SQLite too.

Optuna claims a WAITING trial by reading it ``SELECT ... FOR UPDATE`` and setting it RUNNING if it is still
WAITING. SQLite ignores ``FOR UPDATE``: two workers (two threads of a ``--workers 2`` sweep, or two sweep
commands on one machine) could both read WAITING and both run the same trial: one of the two runners
then finds the run folder in use, and the retry is recorded as failed. Seen in the killed-sweep check
(both retries of a ``--workers 2`` sweep started together) and in 6 of 20 tries of four threads asking at
once. Failing a stale trial is read and written the same way: two workers could each fail it and queue
a retry. Here each change of state holds a lock: one for the threads of this process and, for a SQLite file, an
exclusive ``flock`` on ``<database>.claims.lock`` beside it for the processes of this machine (a
PostgreSQL or MySQL database locks the row itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import optuna
from optuna.trial import TrialState


class SweepStorage(optuna.storages.RDBStorage):
    """``optuna.storages.RDBStorage`` whose changes of a trial's state (a WAITING trial claimed, a stale one failed)
    are one worker's at a time."""

    _claims = threading.Lock()  # the threads of this process

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        database = parsed.database if parsed.get_backend_name() == "sqlite" else None
        self.claims_lock = Path(f"{database}.claims.lock") if database not in (None, "", ":memory:") else None

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        # one change of state at a time: a second claimant of a waiting trial then reads RUNNING and takes another
        # trial; a second worker failing the same stale trial reads FAIL (Optuna skips it) and queues no second retry
        with self._claims, self._machine_lock():
            return super().set_trial_state_values(trial_id, state, values)

    @contextlib.contextmanager
    def _machine_lock(self) -> Iterator[None]:
        if self.claims_lock is None:
            yield
            return
        with open(self.claims_lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
            yield
