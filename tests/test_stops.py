"""SIGTERM to the commands that are not a Lightning run: the stop is honest (exit 143) and leaves
no staging folder, and an earlier output at the same place is kept as it was."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from pipelines.domain_registry import get_domain
from pipelines.export import export_checkpoint
from pipelines.files import sha256_file
from tests.conftest import ROOT, child_env, copy_run


def files_of(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigterm_during_export_exits_143_leaves_no_staging_and_keeps_the_earlier_bundle(tiny_run, tmp_path, child_processes):
    run = copy_run(tiny_run("finance"), tmp_path / "runs")
    checkpoint = run / "checkpoints" / "best.ckpt"
    bundle = run / "export" / "onnx"  # the default folder: the second export writes export/onnx-2 (an earlier bundle is never replaced)
    command = [sys.executable, "-m", "pipelines.run", "finance", "export", "--ckpt_path", str(checkpoint)]
    export_checkpoint(get_domain("finance"), checkpoint, "onnx", bundle)  # the earlier bundle, in this process
    before = files_of(bundle)
    assert "metadata.json" in before

    second = child_processes.start(command, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, staging = time.time() + 240, []
        while time.time() < deadline and second.poll() is None:
            staging = [p for p in bundle.parent.iterdir() if p.name.startswith(f".{bundle.name}-2.")]
            if staging:
                second.send_signal(signal.SIGTERM)
                break
            time.sleep(0.01)
        _, stderr = second.communicate(timeout=120)
    finally:
        if second.poll() is None:
            second.kill()
    assert staging, f"the export ended before its staging folder was seen: {second.returncode}"
    assert second.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert [p.name for p in bundle.parent.iterdir()] == [bundle.name], "no staging folder is left behind"
    assert files_of(bundle) == before, "the earlier bundle is kept as it was"


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    from pipelines.files import write_text_atomic

    (tmp_path / "report.json").mkdir()  # e.g. --json pointing at an existing folder
    try:
        write_text_atomic(tmp_path / "report.json", "{}")
    except OSError:
        pass
    else:
        raise AssertionError("writing over a folder must fail")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"], "the temporary file is removed"


def test_sigterm_while_monitor_writes_its_report_exits_143_and_leaves_no_partial_folder(tmp_path, child_processes):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    columns = [f"f{i}" for i in range(200)]  # a tall figure: its drawing takes long enough for the signal to land mid-way
    pd.DataFrame(rng.normal(size=(5000, 200)), columns=columns).to_parquet(tmp_path / "reference.parquet")
    pd.DataFrame(rng.normal(size=(5000, 200)) + 0.5, columns=columns).to_parquet(tmp_path / "window.parquet")
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "earlier.md").write_text("an earlier report\n")
    command = [sys.executable, "-m", "pipelines.monitor", str(tmp_path / "reference.parquet"), str(tmp_path / "window.parquet"), "--report", str(reports)]
    process = child_processes.start(command, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, staging = time.time() + 240, []
        while time.time() < deadline and process.poll() is None:
            staging = [p for p in reports.iterdir() if p.name.endswith(".partial")]
            if staging:
                process.send_signal(signal.SIGTERM)
                break
            time.sleep(0.005)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert staging, f"the monitor ended before its report's staging folder was seen: {process.returncode}"
    assert process.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in reports.iterdir()) == ["earlier.md"], "no partial report is left, the earlier file is kept"
