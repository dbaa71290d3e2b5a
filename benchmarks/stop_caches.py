"""A streaming cache stopped while it is built: what a kill leaves, and whether the next run recovers.

    python -m benchmarks.stop_caches [--signals KILL TERM] [--vehicles 3000]

For autonomous ``--data.streaming true`` (``domains.autonomous.streaming``; the cache is written under a
temporary ``.<name>.partial-<id>`` folder and renamed when complete, ``pipelines.cache_folders.building``):

1. an undisturbed ``python -m pipelines.run autonomous fit`` on a simulated CSV of ``--vehicles`` vehicles builds
   its cache in one folder (the reference);
2. for each signal, the same command with another cache folder is started as a real child process, watched
   until the temporary folder exists and holds written bytes, and sent the signal; then
   - no folder in the cache directory may look complete (a name without the leading dot) unless it is complete
     (its ``meta.json`` and every file as its manifest says);
   - the same command run again must exit 0, build the cache and train: its cache holds the same files, byte
     for byte (the manifest's SHA-256 of every file), as the reference, and its metrics equal the reference run's.

Prints one line per signal and a table; ``tests/test_autonomous_stopped_cache.py`` (``pytest -m slow``) runs the
same function and asserts each item. About 20 s of child processes per signal on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, child_env, print_table
from pipelines.cache_folders import COMPLETE, manifest_problem

#: a small, fast fit: the cache is built from every row of the file, training reads a few batches
FIT_OPTIONS = ["--data.streaming=true", "--data.chunk_rows=2000", "--data.channels=[speed,yaw_rate]", "--data.batch_size=64",
               "--model.hidden_size=8", "--model.embed_size=4", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
               "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}


def simulated_csv(folder: Path, vehicles: int) -> Path:
    """The simulator's long table (40 rows a vehicle at 0.25 s, grouped by vehicle) as a CSV."""
    from domains.autonomous.simulator import simulate_vehicles

    path = folder / f"vehicles-{vehicles}.csv"
    simulate_vehicles(vehicles, 40, 0.25, 0, 0.003).to_csv(path, index=False)
    return path


def fit_command(table: Path, cache: Path, runs: Path, run_id: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.run", "autonomous", "fit", "--data.path", str(table), f"--data.cache_dir={cache}",
            "--runs_dir", str(runs), "--run_id", run_id, *FIT_OPTIONS]  # fmt: skip


def run_fit(table: Path, cache: Path, runs: Path, run_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(fit_command(table, cache, runs, run_id), cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)


def partial_with_bytes(cache: Path) -> Path | None:
    """A temporary cache folder that already holds written bytes (the build is under way), if any."""
    for folder in cache.glob(".*.partial-*"):
        try:
            if any(p.stat().st_size > 0 for p in folder.iterdir()):
                return folder
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
    return None


def stop_while_building(table: Path, cache: Path, runs: Path, run_id: str, signum: int, deadline_s: float = 300) -> dict[str, Any]:
    """Start the fit, send ``signum`` once the temporary cache folder holds bytes, wait for the process to end."""
    process = subprocess.Popen(fit_command(table, cache, runs, run_id), cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start, seen = time.monotonic(), None
    while time.monotonic() - start < deadline_s and process.poll() is None:
        seen = partial_with_bytes(cache)
        if seen is not None:
            break
        time.sleep(0.01)
    if seen is None or process.poll() is not None:
        process.kill()
        raise RuntimeError(f"the fit ended (exit {process.wait()}) or ran {deadline_s} s before its cache build was seen: {process.stderr.read()[-2000:]}")
    written = sum(p.stat().st_size for p in seen.iterdir() if p.is_file())
    process.send_signal(signum)
    stderr = process.communicate(timeout=120)[1]
    return {"returncode": process.returncode, "seconds_to_signal": round(time.monotonic() - start, 2), "bytes_written_at_signal": written, "stderr": stderr}


def cache_state(cache: Path) -> dict[str, Any]:
    """The folders of a cache directory: complete-looking ones (no leading dot) with what is wrong with each, and temporary ones."""
    looking_complete = {}
    for folder in sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")):
        meta = folder / COMPLETE
        looking_complete[folder.name] = "no meta.json" if not meta.is_file() else manifest_problem(folder, json.loads(meta.read_text()).get("files"))
    return {"complete_looking": looking_complete, "partial": sorted(p.name for p in cache.glob(".*.partial-*"))}


def manifests(cache: Path) -> dict[str, dict]:
    """Each complete cache folder's meta.json: its rows and reports, and its manifest (size and SHA-256 of every file)."""
    out = {}
    for folder in sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")):
        meta = json.loads((folder / COMPLETE).read_text())
        out[folder.name] = meta
    return out


def metrics(runs: Path, run_id: str) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows, without wall-clock fields."""
    rows = [json.loads(line) for line in (runs / "autonomous" / run_id / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if "time" not in k} for row in rows]


def check_stops(folder: Path, names: list[str], vehicles: int = 3000) -> dict[str, Any]:
    """The reference run, then each signal's stopped build and its rerun (see the module docstring); what was seen."""
    table = simulated_csv(folder, vehicles)
    reference = run_fit(table, folder / "cache-reference", folder / "runs", "reference")
    if reference.returncode:
        raise RuntimeError(f"the undisturbed fit exited {reference.returncode}: {reference.stderr[-2000:]}")
    out: dict[str, Any] = {"reference": {"caches": manifests(folder / "cache-reference"), "metrics": metrics(folder / "runs", "reference")}, "stops": {}}
    for name in names:
        cache, run_id = folder / f"cache-{name}", f"stopped-{name}"
        stopped = stop_while_building(table, cache, folder / "runs", run_id, SIGNALS[name])
        after_stop = cache_state(cache)
        again = run_fit(table, cache, folder / "runs", run_id)
        rerun = {"returncode": again.returncode, "stderr": again.stderr[-2000:]}
        if again.returncode == 0:
            rerun |= {"caches": manifests(cache), "metrics": metrics(folder / "runs", run_id), "state": cache_state(cache)}
        out["stops"][name] = {"stopped": stopped, "after_stop": after_stop, "rerun": rerun}
    return out


def verdict(result: dict[str, Any], name: str) -> dict[str, Any]:
    """The checks of one signal's stop, each True when it held."""
    stop, reference = result["stops"][name], result["reference"]
    rerun = stop["rerun"]
    honest = {"KILL": -9, "TERM": 143}[name]  # SIGTERM while the data are read: exit 143 through the clean-up (pipelines.cli)
    return {
        "stopped (exit not 0)": stop["stopped"]["returncode"] != 0,
        f"exit {honest}": stop["stopped"]["returncode"] == honest,
        "SIGTERM leaves no temporary folder": name != "TERM" or not stop["after_stop"]["partial"],
        "no incomplete cache looks complete": all(problem is None for problem in stop["after_stop"]["complete_looking"].values()),
        "rerun exits 0": rerun["returncode"] == 0,
        "rerun removed the killed build's temporary folder": not rerun.get("state", {}).get("partial", ["?"]),
        "rerun cache equals the reference's": rerun.get("caches") == reference["caches"] and len(reference["caches"]) == 1,
        "rerun metrics equal the reference's": rerun.get("metrics") == reference["metrics"] and len(reference["metrics"]) > 0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", nargs="*", choices=sorted(SIGNALS), default=["KILL", "TERM"])
    parser.add_argument("--vehicles", type=int, default=3000, help="simulated vehicles in the CSV (40 rows each)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stop-caches-") as tmp:
        result = check_stops(Path(tmp), args.signals, args.vehicles)
    rows = []
    for name in args.signals:
        stop = result["stops"][name]
        checks = verdict(result, name)
        print(f"[stop_caches] SIG{name}: {json.dumps({k: v for k, v in stop['stopped'].items() if k != 'stderr'})}; after the stop: "
              f"{json.dumps(stop['after_stop'])}; checks: {json.dumps(checks)}", flush=True)  # fmt: skip
        rows.append([f"SIG{name}", stop["stopped"]["returncode"], stop["stopped"]["seconds_to_signal"], stop["stopped"]["bytes_written_at_signal"],
                     len(stop["after_stop"]["complete_looking"]), len(stop["after_stop"]["partial"]), *("yes" if v else "NO" for v in checks.values())])  # fmt: skip
    print_table(["signal", "exit", "s to signal", "bytes in temp folder", "complete-looking folders", "temp folders left",
                 "stopped", "honest exit", "TERM: no temp folder", "none incomplete looks complete", "rerun exit 0", "rerun swept temp folders",
                 "rerun cache = reference", "rerun metrics = reference"], rows)  # fmt: skip
    if not all(all(verdict(result, name).values()) for name in args.signals):
        sys.exit(1)


if __name__ == "__main__":
    main()
