"""Honest stops for the commands that are not a Lightning run (export, monitor, the model registry).

A scheduler stops a job with SIGTERM. Python's default action ends the process at once: no
``finally`` runs, so a staging folder (``.bundle.x1y2``, ``.monitor-....partial``) is left behind
beside the outputs. :func:`sigterm_as_exit` turns SIGTERM into ``SystemExit(143)`` inside the
block, so clean-up code runs, the output stays complete or absent, and the exit status is the
shell's convention for SIGTERM (128 + 15), never 0. SIGINT already raises ``KeyboardInterrupt``
(exit 130 where the command catches it).

>>> import os, signal
>>> try:
...     with sigterm_as_exit("demo"):
...         os.kill(os.getpid(), signal.SIGTERM)
... except SystemExit as stop:
...     print(stop.code)
143
>>> signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored on the way out
True
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pipelines.errors import EXIT_SIGTERM


@contextmanager
def sigterm_as_exit(command: str) -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` (after one line on stderr naming ``command``).

    Only the main thread can install a signal handler; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        print(f"[pipelines] {command}: stopped by SIGTERM; partial output removed, nothing replaced (exit {EXIT_SIGTERM})", file=sys.stderr)
        raise SystemExit(EXIT_SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_process(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM a child that is still running, wait ``grace`` seconds for its own clean-up, then SIGKILL it."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
