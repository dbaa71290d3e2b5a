"""``python -m pipelines.child_run --parent=PID DOMAIN [runner options]``: ``python -m pipelines.run
DOMAIN [runner options]`` that dies with the process ``PID`` that started it (Linux ``PR_SET_PDEATHSIG``).

Sweeps (one trial) and retraining (the training step) start the runner this way: a killed sweep or
retrain leaves no orphaned training behind. Lightning re-launches this same command line for DDP
worker ranks; a worker dies with its rank-zero process instead.
"""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when the thread that started it ends; if ``parent`` is
    already gone (it died before the request took effect), die now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    """Run the runner on ``argv`` (``--parent=PID``, then its arguments after ``python -m pipelines.run``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parent = os.getppid()
    if argv and argv[0].startswith("--parent="):
        given = int(argv.pop(0).partition("=")[2])
        parent = given if os.environ.get("LOCAL_RANK", "0") == "0" else parent  # a DDP worker: its rank zero
    die_with_parent(parent)
    from pipelines.run import main as run_main

    run_main(argv)


if __name__ == "__main__":
    main()
