"""The checks too long for the default suite, run by one command: every test marked ``slow``.

    python -m benchmarks.slow_checks [-k EXPRESSION] [--workers N] [--timeout SECONDS]

The default suite (``pytest``) leaves out the tests marked ``slow`` (the 30-night retraining soak, the
killed-sweep resume, the real Airflow DAG load, the healthcare and autonomous 2-process streaming DDP
runs, caches killed while they are built, ...) to stay under ten minutes on two cores. This command
runs them all (``pytest -m slow``, one test file per worker), then prints one row per test: outcome
and seconds, and the whole run's wall and CPU time, and writes the rows to
``benchmarks/results/slow_checks.json``. Exit status: pytest's (0 when every slow check passed), so
a nightly job can run it as it runs the suite. ``docs/testing.md`` says what each slow check covers;
``benchmarks/RESULTS.md`` keeps the last run's table.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.common import RESULTS, ROOT
from pipelines.files import write_json_atomic


def outcomes(junit: Path) -> list[dict[str, object]]:
    """One row per test case of a JUnit XML report: test id, outcome, seconds, and the first line of
    the failure or skip message."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[problem.tag] if problem is not None else "passed"
        message = (problem.get("message") or "").splitlines()[0][:160] if problem is not None else ""
        test_id = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        rows.append({"test": test_id, "outcome": outcome, "seconds": round(float(case.get("time", 0.0)), 1), "message": message})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="expression", help="only the slow checks whose name matches (pytest -k)")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (0: one process)")
    parser.add_argument("--timeout", type=int, help="seconds per test (pytest-timeout; default: the project's): a loaded machine needs more")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "slow.xml"
        command = [sys.executable, "-m", "pytest", "-m", "slow", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                   "-n", str(args.workers), "--dist", "loadfile", *(["-k", args.expression] if args.expression else []),
                   *([f"--timeout={args.timeout}"] if args.timeout else [])]  # fmt: skip
        started, before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        status = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.time() - started
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        rows = outcomes(junit) if junit.exists() else []
    print("\n| slow check | outcome | s |\n|---|---|---|")
    for row in rows:
        print(f"| `{row['test']}` | {row['outcome']}{': ' + str(row['message']) if row['message'] else ''} | {row['seconds']} |")
    print(f"\n{len(rows)} slow checks, {sum(r['outcome'] == 'passed' for r in rows)} passed; {wall:.0f} s wall, {cpu:.0f} s CPU (user+sys); pytest exit {status}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "slow_checks.json", {"rows": rows, "wall_s": wall, "cpu_s": cpu, "exit": status, "load": os.getloadavg()})
    return status


if __name__ == "__main__":
    sys.exit(main())
