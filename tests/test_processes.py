"""The tests' child-process helpers (``tests/processes.py``) leave nothing running when a test fails or times out.

A parent that starts a worker (as ``pipelines.serve`` starts its HTTP and inference processes) is started
through each helper, the test using it fails (an assertion, pytest-timeout), and no pid of either is left.
The slow test does the same with a real ``pipelines.serve`` server and its workers.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import pytest

from tests.conftest import child_env
from tests.processes import alive, child_process, group_members, run_child, start_child, stop_group

#: a parent that starts a worker (not in a new session), prints both pids, and sleeps until killed
PARENT_WITH_WORKER = (
    "import subprocess, sys, time\n"
    "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print(worker.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def parent_and_worker(process: subprocess.Popen) -> list[int]:
    worker = int(process.stdout.readline())
    assert alive(process.pid) and alive(worker)
    return [process.pid, worker]


def test_a_failing_block_stops_the_child_and_its_worker():
    with pytest.raises(AssertionError, match="deliberately"):
        with child_process([sys.executable, "-c", PARENT_WITH_WORKER], stdout=subprocess.PIPE, text=True) as process:
            pids = parent_and_worker(process)
            assert group_members(process.pid) == sorted(pids)
            raise AssertionError("deliberately failing while both run")
    assert not [pid for pid in pids if alive(pid)] and group_members(pids[0]) == []


def test_the_worker_of_a_dead_parent_is_stopped_too():
    """The case a failed test left behind: the parent was killed (SIGKILL to its pid only), its worker ran on."""
    process = start_child([sys.executable, "-c", PARENT_WITH_WORKER], stdout=subprocess.PIPE, text=True)
    try:
        parent, worker = parent_and_worker(process)
        process.kill()
        process.wait(10)
        assert alive(worker), "an orphaned worker outlives its killed parent"
    finally:
        assert stop_group(process) == [worker]  # what was still running
    assert not alive(worker) and group_members(parent) == []


def test_a_timed_out_run_child_stops_the_child_and_its_worker(tmp_path):
    pids = tmp_path / "pids"
    script = PARENT_WITH_WORKER.replace("print(worker.pid, flush=True)", f"open({str(pids)!r}, 'w').write(f'{{__import__(\"os\").getpid()}} {{worker.pid}}')")
    with pytest.raises(subprocess.TimeoutExpired):
        run_child([sys.executable, "-c", script], 1)
    parent, worker = (int(pid) for pid in pids.read_text().split())
    assert not alive(parent) and not alive(worker)


def test_the_fixture_stops_children_of_a_failed_and_of_a_timed_out_test(tmp_path):
    """An inner pytest session: one test fails, one is stopped by pytest-timeout, each with a parent and its worker
    started through ``child_processes``; after it, none of the four processes runs."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import child_processes  # noqa: F401\n")
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        from pathlib import Path
        import pytest
        PARENT_WITH_WORKER = {PARENT_WITH_WORKER!r}

        def started(child_processes, name):
            process = child_processes.start([sys.executable, "-c", PARENT_WITH_WORKER], stdout=subprocess.PIPE, text=True)
            Path({str(tmp_path)!r}, name).write_text(f"{{process.pid}} {{process.stdout.readline().strip()}}")

        def test_fails(child_processes):
            started(child_processes, "failed.pids")
            assert False, "deliberately"

        @pytest.mark.timeout(1)
        def test_times_out(child_processes):
            started(child_processes, "timed-out.pids")
            time.sleep(60)
    """))
    inner = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(tmp_path)], 120, cwd=tmp_path, env=child_env())
    assert inner.returncode == 1 and "2 failed" in inner.stdout and "Timeout" in inner.stdout, inner.stdout[-3000:] + inner.stderr[-2000:]
    pids = [int(pid) for name in ("failed.pids", "timed-out.pids") for pid in (tmp_path / name).read_text().split()]
    assert len(pids) == 4 and not [pid for pid in pids if alive(pid)]


# Slow: a real server (the finance tiny run, exported, served: ~30 s on 2 cores); python -m benchmarks.slow_checks -k processes
@pytest.mark.slow
def test_a_real_server_and_its_workers_are_gone_after_a_failing_test(tiny_run, tmp_path):
    from pipelines.domain_registry import get_domain
    from pipelines.export import export_checkpoint
    from tests.helpers import start_server

    bundle = export_checkpoint(get_domain("finance"), tiny_run("finance") / "checkpoints" / "last.ckpt", "onnx", tmp_path / "bundle")
    served = start_server("finance", bundle, tmp_path / "server.log")
    with pytest.raises(AssertionError, match="deliberately"):
        try:
            pids = group_members(served.process.pid)
            assert served.process.pid in pids and len(pids) >= 2, f"LitServe runs its workers as child processes: {pids}"
            served.process.send_signal(signal.SIGKILL)  # what the old clean-up did: the parent only
            served.process.wait(10)
            assert [pid for pid in pids if alive(pid)], "the workers outlive their killed parent"
            raise AssertionError("deliberately failing while the server's workers run")
        finally:
            served.kill()
    assert not [pid for pid in pids if alive(pid)], served.output()
