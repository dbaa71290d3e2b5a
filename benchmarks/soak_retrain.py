"""Soak test of scheduled retraining: N simulated nights with a rolling data file, drift and faults.

    python -m benchmarks.soak_retrain                       # 30 nights, finance + healthcare
    python -m benchmarks.soak_retrain --nights 8 --domains finance --json soak.json --shared_data ../shared/data

Each night overwrites ``latest.npz`` (finance: a window sliding through ADBench campaign with a
gradual shift of its features; healthcare: a fresh draw of BreastMNIST images that slowly
brighten; both from ../shared/data, finance falls back to generated rows without it) and calls
``python -m pipelines.retrain`` as a real child process, as cron would. On chosen nights a fault is
injected: a corrupt file, NaN rows, a diverging learning rate, SIGKILL at a point in training,
evaluation or promotion (or at a random time), SIGTERM, a concurrent second call, a read-only
registry. After every night it asserts: the registry verifies, the lock is free, the champion
passes the domain's sanity floors, the exit code is one the fault allows, and nothing was lost
(history rows only grow, every version the champion chain or an alias needs exists). At the end
one more call reconciles whatever a kill left, and every version must be in the history.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_CANDIDATES = [ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data"]
OK, FAILED, USAGE, KEPT, NOTHING_NEW, LOCKED = 0, 1, 2, 3, 4, 5
KILLED = -signal.SIGKILL

#: runner options per domain: tiny runs, the same every night
OPTIONS = {
    "finance": ["--data.batch_size=128", "--trainer.max_epochs=1", "--trainer.limit_train_batches=6", "--trainer.logger=false", "--data.path"],
    "healthcare": ["--data.batch_size=32", "--model.network=resnet10", "--model.width=0.25", "--data.augment=null", "--trainer.max_epochs=1",
                   "--trainer.limit_train_batches=4", "--trainer.logger=false", "--data.npz_path"],  # fmt: skip
}
DIVERGE = {"finance": "--model.lr=1", "healthcare": "--model.lr=1000"}  # finance takes lr <= 1: at 1 its test loss is ~5e10
#: the fault schedule of a 30-night soak (night -> fault); other nights are plain nights with drift
SCHEDULE = {
    3: "corrupt", 5: "nan_rows", 7: "diverge", 9: "kill_train", 11: "kill_eval", 13: "kill_promote", 15: "sigterm",
    17: "concurrent", 19: "read_only", 21: "kill_random", 23: "corrupt", 25: "kill_eval", 27: "diverge", 29: "kill_promote",
}  # fmt: skip
#: exit codes each fault allows (a runner that catches divergence itself exits 1 instead of 3)
ALLOWED = {
    "none": {OK, KEPT, NOTHING_NEW}, "corrupt": {FAILED}, "nan_rows": {OK, KEPT, FAILED}, "diverge": {KEPT, FAILED},
    "kill_train": {KILLED}, "kill_eval": {KILLED}, "kill_promote": {KILLED, OK, KEPT}, "kill_random": {KILLED, OK, KEPT, NOTHING_NEW, FAILED},
    "sigterm": {FAILED}, "concurrent": {OK, KEPT, NOTHING_NEW}, "read_only": {FAILED},
}  # fmt: skip


def shared(relative: str) -> Path | None:
    """A real data set under the shared data folder (``--shared_data``, else ../shared/data beside
    the project or beside its folder), or ``None``."""
    return next((base / relative for base in SHARED_CANDIDATES if (base / relative).exists()), None)


def write_atomic(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(".incoming.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def write_night(domain: str, path: Path, night: int, fault: str) -> None:
    """Overwrite the rolling file for ``night`` (drift grows with the night)."""
    rng = np.random.default_rng(night)
    if fault == "corrupt":
        path.write_bytes(b"PK\x03\x04" + rng.bytes(2048))
        return
    if domain == "finance":
        source = shared("finance/campaign.npz")
        if source is not None:
            data = np.load(source)
            start = (night * 400) % (len(data["y"]) - 4000)
            X, y = data["X"][start : start + 4000].astype("float32"), data["y"][start : start + 4000]
        else:
            X = rng.normal(size=(4000, 24)).astype("float32")
            y = (rng.random(4000) < 0.1).astype("float64")
            X[y == 1] += 2.5
        X[:, :8] += 0.03 * night  # gradual drift of the first features
        if fault == "nan_rows":
            X[rng.choice(len(X), 40, replace=False)] = np.nan
        write_atomic(path, X=X, y=y)
        return
    data = np.load(shared("healthcare/breastmnist.npz"))
    arrays = {}
    for split, count in (("train", 320), ("val", 64), ("test", 128)):
        pick = rng.choice(len(data[f"{split}_labels"]), count, replace=False)
        images = np.clip(data[f"{split}_images"][pick].astype("int16") + night, 0, 255).astype("uint8")  # slow brightening
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, data[f"{split}_labels"][pick]
    if fault == "nan_rows":
        images = arrays["train_images"].astype("float32")
        images[:16] = np.nan
        arrays["train_images"] = images
    write_atomic(path, **arrays)


def child_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(home)}
    for name in ("WANDB_SERVICE", "PIPELINES_RUN_ID"):
        env.pop(name, None)
    return env


def wait_for(condition: Any, process: subprocess.Popen, timeout: float = 600, poll: float = 0.002) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(poll)
    return False


class Soak:
    """One domain's soak: a work folder with ``latest.npz``, ``registry/``, ``runs/``."""

    def __init__(self, domain: str, work: Path, seed: int, keep: int) -> None:
        self.domain, self.work, self.keep = domain, work, keep
        self.random = random.Random(seed)
        self.registry_root, self.runs = work / "registry", work / "runs"
        self.data = work / "latest.npz"
        self.rows: list[dict[str, Any]] = []
        (work / "home").mkdir(parents=True, exist_ok=True)

    def command(self, fault: str) -> list[str]:
        options = [*OPTIONS[self.domain], str(self.data)]
        extra = [DIVERGE[self.domain]] if fault == "diverge" else []
        return [sys.executable, "-m", "pipelines.retrain", self.domain, "--registry", str(self.registry_root), "--runs_dir", str(self.runs),
                "--keep", str(self.keep), "--warm_start", *options, *extra]  # fmt: skip

    def night(self, number: int, fault: str) -> dict[str, Any]:
        from pipelines.model_registry import ModelRegistry

        registry = ModelRegistry(self.registry_root, self.domain)
        history_before, chain_before = len(registry.history()), set(registry.rollback_chain())
        write_night(self.domain, self.data, number, fault)
        started = time.time()
        code, landed = self.run(fault, registry)
        if landed == "-" and (fault.startswith("kill") or fault == "sigterm"):
            fault, landed = "none", f"{fault} missed (the attempt ended first)"
        row = {"night": number, "domain": self.domain, "fault": fault, "exit": code, "landed": landed, "seconds": round(time.time() - started, 1)}
        row.update(self.check(registry, fault, code, history_before, chain_before))
        self.rows.append(row)
        return row

    def run(self, fault: str, registry: Any) -> tuple[int, str]:
        env = child_env(self.work / "home")
        log = open(self.work / "night.log", "w")
        kwargs: dict[str, Any] = {"cwd": self.work, "env": env, "stdout": log, "stderr": subprocess.STDOUT}
        if fault == "read_only":
            return self._read_only(kwargs), "-"
        before = set(self.runs.glob(f"{self.domain}/*")) if self.runs.is_dir() else set()
        process = subprocess.Popen(self.command(fault), **kwargs)
        landed = "-"
        try:
            if fault == "concurrent":
                lock = registry.path / ".lock"  # read, never taken: probing the lock could make the first call exit "locked"
                wait_for(lambda: lock.is_file() and f'"pid": {process.pid}' in lock.read_text(), process, poll=0.05)
                second = subprocess.run(self.command("none"), cwd=self.work, env=env, capture_output=True, text=True, timeout=120)
                landed = f"second call exit {second.returncode}"
                assert second.returncode == LOCKED, f"a concurrent call must exit {LOCKED}, got {second.returncode}: {second.stderr[-500:]}"
            elif fault in ("kill_train", "sigterm"):
                new = lambda: [p for p in self.runs.glob(f"{self.domain}/retrain-*") if p not in before and ((p / "metrics.jsonl").exists() or (p / "checkpoints").is_dir())]  # noqa: E731
                if wait_for(new, process, poll=0.05):
                    time.sleep(self.random.uniform(0.0, 1.0))
                    process.send_signal(signal.SIGKILL if fault == "kill_train" else signal.SIGTERM)
                    landed = "training"
            elif fault == "kill_eval":
                if wait_for(lambda: any(p not in before for p in self.runs.glob(f"{self.domain}/retrain-*-eval-challenger")), process, poll=0.02):
                    time.sleep(self.random.uniform(0.0, 0.8))
                    process.send_signal(signal.SIGKILL)
                    landed = "evaluation"
            elif fault == "kill_promote":
                count = len(registry.versions())
                if wait_for(lambda: any(registry.versions_dir.glob(".tmp-v*")) or len(registry.versions()) > count, process, poll=0.0005):
                    process.send_signal(signal.SIGKILL)
                    landed = "promotion (version being written)" if any(registry.versions_dir.glob(".tmp-v*")) else "promotion (version written)"
            elif fault == "kill_random":
                delay = self.random.uniform(2.0, 25.0)
                wait_for(lambda: False, process, timeout=delay, poll=0.05)
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    landed = f"random ({delay:.1f} s)"
            code = process.wait(timeout=900)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
        return code, landed

    def _read_only(self, kwargs: dict[str, Any]) -> int:
        """The registry is read-only to the retrain: a read-only bind mount in a private mount
        namespace when we are root (root writes through permission bits), else permission bits."""
        command = self.command("none")
        if os.geteuid() == 0:
            mount = f"mount --bind -o ro {shlex.quote(str(self.registry_root))} {shlex.quote(str(self.registry_root))}"
            return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mount} && exec {shlex.join(command)}"], **kwargs, timeout=300).returncode
        folders = [p for p in [self.registry_root, *self.registry_root.rglob("*")] if p.is_dir()]
        modes = {p: p.stat().st_mode for p in folders}
        for p in folders:
            p.chmod(0o555)
        try:
            return subprocess.run(command, **kwargs, timeout=300).returncode
        finally:
            for p, mode in modes.items():
                p.chmod(mode)

    def check(self, registry: Any, fault: str, code: int, history_before: int, chain_before: set[str]) -> dict[str, Any]:
        from pipelines.domain_registry import get_domain
        from pipelines.selection import Selection

        assert code in ALLOWED[fault], f"night with {fault}: exit {code}, allowed {sorted(ALLOWED[fault])}; log: {(self.work / 'night.log').read_text()[-2000:]}"
        problems = registry.verify()
        assert problems == [], problems
        assert not registry.is_locked(), "the lock must be free after the night"
        history = registry.history()
        assert len(history) >= history_before, "history rows are never lost"
        needed = set(registry.rollback_chain()) | set(registry.aliases().values())
        assert needed <= set(registry.versions()), f"versions the champion chain needs are missing: {needed - set(registry.versions())}"
        assert chain_before <= set(registry.versions()), "a champion of an earlier night disappeared"
        champion = registry.champion()
        quality, metric = None, None
        if champion:
            meta = registry.metadata(champion)
            rules = Selection.for_domain(get_domain(self.domain), None, [])
            assert rules.failed_floors(meta["metrics"]) == [], f"champion {champion} is below the floors: {rules.failed_floors(meta['metrics'])}"
            metric, quality = meta["metric"], meta["score"]
        return {"champion": champion or "-", "metric": metric, "quality": quality, "versions": len(registry.versions())}

    def finish(self) -> dict[str, Any]:
        """One more plain call reconciles what the last kill left; every version is then in the history."""
        from pipelines.model_registry import ModelRegistry
        from pipelines.registry_upkeep import recorded_versions

        code = subprocess.run(self.command("none"), cwd=self.work, env=child_env(self.work / "home"), capture_output=True, text=True, timeout=900).returncode
        registry = ModelRegistry(self.registry_root, self.domain)
        orphans = set(registry.versions()) - recorded_versions(registry)
        assert code in ALLOWED["none"] and not orphans and registry.verify() == [], (code, orphans)
        return {"final_exit": code, "history_rows": len(registry.history()), "reconciled": sum(1 for r in registry.history() if r.get("reconciled"))}


def soak(domains: list[str], nights: int, work: Path, seed: int = 0, keep: int = 5, schedule: dict[int, str] | None = None, echo: bool = True) -> dict[str, Any]:
    """Run the soak; return ``{"rows", "summary"}``. Raises ``AssertionError`` at the first broken promise."""
    schedule = SCHEDULE if schedule is None else schedule
    result: dict[str, Any] = {"rows": [], "summary": {}}
    for domain in domains:
        if domain == "healthcare" and shared("healthcare/breastmnist.npz") is None:
            print("[soak] skipping healthcare: ../shared/data/healthcare/breastmnist.npz is absent", file=sys.stderr)
            continue
        runner = Soak(domain, work / domain, seed, keep)
        for night in range(1, nights + 1):
            row = runner.night(night, schedule.get(night, "none"))
            result["rows"].append(row)
            if echo:
                print(format_row(row), flush=True)
        faults = [r for r in runner.rows if r["fault"] != "none"]
        result["summary"][domain] = {"nights": nights, "faults": len(faults), "faults_survived": len(faults), **runner.finish()}
    return result


COLUMNS = ("night", "domain", "fault", "exit", "landed", "champion", "metric", "quality", "versions", "seconds")


def format_row(row: dict[str, Any]) -> str:
    cells = [f"{row[c]:.4f}" if c == "quality" and row[c] is not None else str(row[c] if row[c] is not None else "-") for c in COLUMNS]
    return " | ".join(cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak_retrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--domains", nargs="+", default=["finance", "healthcare"])
    parser.add_argument("--keep", type=int, default=5, help="retention of the retrain calls (--keep)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, deleted afterwards)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and summary here")
    parser.add_argument("--shared_data", type=Path, default=None, help="folder of the real data sets (default: ../shared/data beside the project or its folder)")
    args = parser.parse_args(argv)
    if args.shared_data is not None:
        if not args.shared_data.is_dir():
            parser.error(f"--shared_data {args.shared_data}: no such folder")
        SHARED_CANDIDATES.insert(0, args.shared_data)
    work = args.work or Path(tempfile.mkdtemp(prefix="soak-"))
    started = time.time()
    print("| " + " | ".join(COLUMNS) + " |")
    try:
        result = soak(args.domains, args.nights, work, args.seed, args.keep)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result["summary"]["wall_s"] = round(time.time() - started)
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
