"""Shared fixtures: every run goes to a temporary runs folder, W&B offline and quiet.

``tiny_run(domain)`` is each domain's tiny run (``python -m pipelines.run DOMAIN`` with the spec's
``test_args``: fit, then test), trained once per session on first use and shared by every test file
that needs a trained run (export, serving, the registry suite, bad scoring files). Treat it as
read-only: a test that writes into a run folder (predict, resume) works on ``copy_run(...)``.
``autonomous_fleet_run`` is the same for the run on the tiny fleet table of ``tests/autonomous_fleet.py``
(each test module gets its own copy), ``finance_champion`` for a finance registry's first champion.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.processes import ChildProcesses, child_process, run_child

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# One intra-op torch (OpenMP) thread per process, here and in every child process (child_env copies os.environ),
# set before torch is imported: the suite runs two xdist workers on two cores, so a second thread per process only
# contends with the other worker (a healthcare tiny run: 37 -> 23 CPU-s, 181 -> 94 s wall, on the loaded 2-core machine)
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # a plugin imported it first: the variable came too late for this process
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is now (pytest swaps it for each test that captures)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _follow_stderr() -> None:
    """Lightning's loggers keep the ``sys.stderr`` of their first import; under pytest that is a
    capture closed by an earlier test, and each record then prints a '--- Logging error ---' traceback."""
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.stream = _CurrentStderr()  # not setStream: it flushes the old, closed stream


@pytest.fixture(autouse=True)
def _lightning_logs_to_the_current_stderr() -> None:
    _follow_stderr()


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: real data sets live in ../shared/data beside the project (not in a fresh clone)")
    return path


#: the longest files (30-75 s each on 2 cores), run first: each xdist worker takes a whole file
#: (``--dist loadfile``), so long files started last would leave one worker busy while the other idles
LONGEST_FIRST = (
    "test_retrain.py", "test_retrain_policy.py", "test_drift.py", "test_sweep.py", "test_serving_registry.py",
    "test_platform.py", "test_ddp_evaluation.py", "test_registry.py", "test_finance_streaming.py", "test_honest_exits.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every other file keeps its order


_CHECKOUT_BEFORE = pytest.StashKey[set[str]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_CHECKOUT_BEFORE] = {path.name for path in ROOT.iterdir()}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a test left a new file or folder at the top of the checkout (a run folder, an
    offline W&B run, a registry written relative to the working directory): tests write under their
    ``tmp_path``, and what lands in a user's checkout uninvited is a defect. Checked once, by the
    process that collected the session (xdist's controller, or the only process)."""
    if hasattr(session.config, "workerinput") or _CHECKOUT_BEFORE not in session.config.stash:
        return
    left = sorted({path.name for path in ROOT.iterdir()} - session.config.stash[_CHECKOUT_BEFORE] - {".pytest_cache", "__pycache__"})
    if left:
        print(f"\n[conftest] the tests left {', '.join(left)} at the top of the checkout {ROOT}: a test wrote outside its tmp_path", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def run_pipeline(*args: str) -> None:
    """Run ``python -m pipelines.run ARGS`` in this process (no interpreter start-up cost)."""
    from pipelines.run import main

    main(list(args))


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a fresh shell: no W&B service or run id inherited from this test process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    for name in ("PIPELINES_RUN_ID", "WANDB_SERVICE"):
        env.pop(name, None)
    return env


def run_pipeline_process(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m pipelines.run ARGS`` as a real child process (its whole process group killed on a timeout)."""
    return run_child([sys.executable, "-m", "pipelines.run", *args], timeout, cwd=ROOT, env=child_env(**(env or {})))


def kill_at_first_checkpoint(args: list[str], checkpoints: str, runs_dir: Path, settle: float = 0.0) -> None:
    """Start ``python -m pipelines.run ARGS``, SIGKILL it as soon as a file matching ``checkpoints``
    (a glob under ``runs_dir``) exists (after ``settle`` seconds more), and wait for it to die."""
    with child_process(
        [sys.executable, "-m", "pipelines.run", *args], cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as process:  # its process group is killed however this ends
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None and not list(runs_dir.glob(checkpoints)):
            time.sleep(0.05)
        assert process.poll() is None, f"run ended before it could be killed: {process.stderr.read()[-2000:]}"
        time.sleep(settle)
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.fixture
def child_processes() -> Iterator[ChildProcesses]:
    """``child_processes.start(command, **popen)``: ``subprocess.Popen`` in a new process group; when the test ends
    (passed, failed, or stopped by pytest-timeout) each child and every process it started are killed and waited for."""
    children = ChildProcesses()
    try:
        yield children
    finally:
        children.stop_all()


def only_run(runs_dir: Path, domain: str) -> Path:
    runs = sorted(p for p in (runs_dir / domain).iterdir() if p.is_dir())
    assert len(runs) == 1, f"expected one run folder, found {[p.name for p in runs]}"
    return runs[0]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def _trained_once(tmp_path_factory: pytest.TempPathFactory, name: str, train) -> Path:
    """The folder ``name`` that ``train(folder)`` fills, trained once per session and shared by the xdist workers
    too: the first worker that asks trains it (under an ``fcntl`` lock) in the session's common temporary folder,
    the other one then finds it there instead of training it again. Read-only for the tests that use it."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # under xdist: the folder above each worker's own
    folder = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, or when a crashed worker dies
        if not (folder / "complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed mid-run left
            folder.mkdir(parents=True)
            train(folder)
            (folder / "complete").write_text("")
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_run(domain)``: the run folder of the domain's tiny run, trained the first time it is asked for
    (once per session, whichever xdist worker asks first: ``_trained_once``)."""
    from pipelines.domain_registry import get_domain

    runs: dict[str, Path] = {}

    def get(domain: str) -> Path:
        if domain not in runs:
            train = lambda folder: run_pipeline(domain, *get_domain(domain).test_args, "--runs_dir", str(folder / "runs"))  # noqa: E731
            runs[domain] = only_run(_trained_once(tmp_path_factory, f"tiny-run-{domain}", train) / "runs", domain)
        return runs[domain]

    return get


@pytest.fixture(scope="module")
def autonomous_fleet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(folder, runs_dir, run folder): an autonomous run fitted on the tiny fleet of ``tests/autonomous_fleet.py``
    (``fleet.csv`` in the shared folder, observe 4, predict 4), for the files that score bad or rescaled tables
    with a trained checkpoint (tests/test_bad_inputs_autonomous.py, tests/test_autonomous_units.py). Trained once
    per session (``_trained_once``); each test module gets its own copy of the run, which its tests may write into
    (predictions, checkpoints without the scale), while a module in the other worker reads its own."""
    from tests.autonomous_fleet import BASE, fleet, write

    def train(folder: Path) -> None:
        write(fleet(), folder / "fleet.csv")
        run_pipeline("autonomous", "fit", f"--data.path={folder / 'fleet.csv'}", *BASE, "--data.observe=4", "--data.predict=4", "--runs_dir", str(folder / "runs"))

    trained = only_run(_trained_once(tmp_path_factory, "autonomous-fleet-run", train) / "runs", "autonomous")
    folder = tmp_path_factory.mktemp("autonomous-fleet-run")
    return folder, folder / "runs", copy_run(trained, folder / "runs")


@pytest.fixture(scope="session")
def finance_champion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``registry``: a finance model registry whose champion v0001 was promoted by one real
    ``pipelines.retrain`` on night 1 (``tests/helpers.py``: ``write_night``, the ``FAST`` options), with that
    attempt's ``runs`` and ``latest.npz``. The first champion that tests/test_drift.py and tests/test_serving_registry.py
    start from, trained once per session (``_trained_once``). Read-only: a test copies ``registry`` into its own folder
    (the registry keeps its evaluation snapshot relative to itself) and retrains there."""
    from pipelines.retrain import main as retrain_main
    from tests.helpers import FAST, write_night

    def train(folder: Path) -> None:
        write_night(folder / "latest.npz", 1)
        code = retrain_main(["finance", "--registry", str(folder / "registry"), "--runs_dir", str(folder / "runs"), *FAST, "--data.path", str(folder / "latest.npz")])
        assert code == 0, f"the first finance retrain was not promoted (exit {code})"

    return _trained_once(tmp_path_factory, "finance-champion", train)


def copy_run(run: Path, runs_dir: Path) -> Path:
    """A copy of the run folder ``run`` in ``runs_dir/<domain>/<run id>`` (same id), for a test that writes into it."""
    copy = runs_dir / run.parent.name / run.name
    shutil.copytree(run, copy)
    return copy
