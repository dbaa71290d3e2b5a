"""Child processes of the tests, each in its own session, stopped with every process it started.

A test that starts a server, a sweep, a retraining attempt or a runner as a child process starts it
with :func:`start_child` (``subprocess.Popen(..., start_new_session=True)``: the child leads a new
process group, which its workers, forked HTTP processes and export children join) and ends with
:func:`stop_group` in a ``finally`` block or a fixture finaliser, or uses :func:`child_process` /
:func:`run_child`. Whatever the test's outcome (a failed assertion, an exception, pytest-timeout's
signal), the child and its whole group get SIGKILL and are waited for, so nothing keeps running
after the test (a failed registry-serving test once left its server and inference worker running
for an hour: only the parent had been killed). A process that starts its own session (a sweep's
trials, a retraining's runner) dies with its parent instead (``pipelines.child_run``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator


def group_members(group: int) -> list[int]:
    """Pids of the live (not zombie) processes of the process group ``group``, read from ``/proc``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (command name)": state, ppid, pgrp, ...
        except OSError:  # ended meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return sorted(members)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_child(command: list[str], **popen: Any) -> subprocess.Popen:
    """``subprocess.Popen(command, **popen)`` as the leader of a new session and process group (its id is the child's pid)."""
    return subprocess.Popen(command, start_new_session=True, **popen)


def stop_group(process: subprocess.Popen, timeout: float = 30.0) -> list[int]:
    """SIGKILL ``process`` and every process of its group (the group it leads: :func:`start_child`), wait for
    the child and until none of the group runs. Returns the pids that were still running (the child first,
    if it was). Safe to call twice, and after the child ended by itself (its orphans are still found)."""
    running = ([process.pid] if process.poll() is None else []) + [pid for pid in group_members(process.pid) if pid != process.pid]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout)
    deadline = time.monotonic() + timeout
    while group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = group_members(process.pid)
    assert not left, f"processes {left} of the group of {process.args!r} still run {timeout} s after SIGKILL"
    return running


@contextlib.contextmanager
def child_process(command: list[str], **popen: Any) -> Iterator[subprocess.Popen]:
    """``with child_process(command, ...) as process:`` :func:`start_child`, and :func:`stop_group` when the block ends, however it ends."""
    process = start_child(command, **popen)
    try:
        yield process
    finally:
        stop_group(process)


def run_child(command: list[str], timeout: float, **popen: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout, **popen)``, but on a timeout
    (or any exception, KeyboardInterrupt included) the whole process group is killed, not only the child."""
    with child_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen) as process:
        out, err = process.communicate(timeout=timeout)  # TimeoutExpired propagates after the group is killed
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


class ChildProcesses:
    """The child processes one test starts (the ``child_processes`` fixture of ``tests/conftest.py``): each in its
    own process group, all stopped with their groups when the test ends, passed or failed or timed out."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, command: list[str], **popen: Any) -> subprocess.Popen:
        """:func:`start_child`, remembered for :meth:`stop_all`."""
        process = start_child(command, **popen)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        """:func:`stop_group` for every child started, each even if stopping an earlier one failed."""
        with contextlib.ExitStack() as stack:
            for process in self.started:
                stack.callback(stop_group, process)
