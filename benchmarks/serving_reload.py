"""Hot-reload benchmark: a promotion while ``pipelines.serve --registry`` is under load.

``python -m benchmarks.serving_reload [--clients 8] [--before 5] [--after 5]``

Two real ``pipelines.retrain finance`` runs (the synthetic card table, tiny training: two versions,
the second forced) make a registry; ``v0001`` is made the champion; the server follows it
(``--registry DIR --reload_interval 0.5``) while ``--clients`` threads send generic-form requests
without pause; after ``--before`` seconds ``python -m pipelines.registry finance promote v0002``
runs, and the clients go on until ``--after`` seconds after the first answer from ``v0002``.
Reported: requests, failed requests, requests/s and p50/p99 latency before the promotion, during
the reload (promotion to first new answer) and after it, and the seconds from the promotion to the
first answer of the new version. Prints a table and writes ``benchmarks/results/serving_reload.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.serving import ROOT, free_port, percentiles
from pipelines.model_registry import ModelRegistry
from pipelines.domain_registry import get_domain


def run(*command: str) -> int:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode  # fmt: skip


def make_registry(work: Path) -> Path:
    options = ["--registry", str(work / "registry"), "--runs_dir", str(work / "runs"), *get_domain("finance").test_args, "--trainer.logger=false"]
    assert run("pipelines.retrain", "finance", *options) == 0, "first retrain failed"
    assert run("pipelines.retrain", "finance", *options, "--force", "--seed_everything=7") in (0, 3), "second retrain failed"
    registry = ModelRegistry(work / "registry", "finance")
    if registry.champion() != "v0001":
        assert run("pipelines.registry", "finance", "rollback", "--registry", str(work / "registry")) == 0
    return work / "registry"


def post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return response.status, response.headers.get("X-Model-Version", "")
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return -1, ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--before", type=float, default=5.0)
    parser.add_argument("--after", type=float, default=5.0)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    registry = make_registry(work)
    port, log = free_port(), work / "server.log"
    command = [sys.executable, "-m", "pipelines.serve", "finance", "--registry", str(registry), "--reload_interval", "0.5", "--port", str(port), "--log_level", "warning"]
    with open(log, "wb") as handle:
        server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url + "/info", timeout=2) as response:
                spec = json.loads(response.read())["model"]["inputs"][0]
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    body = json.dumps({"inputs": {spec["name"]: [0.1] * spec["shape"][1]}}).encode()
    results: list[tuple[float, float, int, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            start = time.monotonic()
            status, version = post(url + "/predict", body)
            results.append((start, time.monotonic() - start, status, version))

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(args.before)
    promoted = time.monotonic()
    assert run("pipelines.registry", "finance", "promote", "v0002", "--registry", str(registry)) == 0
    while not any(v == "v0002" for _, _, _, v in results[-50:]) and time.monotonic() < promoted + 300:
        time.sleep(0.1)
    switched = min((s + d for s, d, _, v in results if v == "v0002"), default=float("nan"))
    time.sleep(args.after)
    stop.set()
    for thread in threads:
        thread.join(60)
    ended = time.monotonic()
    server.send_signal(signal.SIGTERM)
    code = server.wait(60)

    def phase(name: str, low: float, high: float) -> dict[str, Any]:
        rows = [r for r in results if low <= r[0] < high]
        return {"phase": name, "requests": len(rows), "failed": sum(r[2] != 200 for r in rows), "seconds": high - low,
                "requests_per_s": len(rows) / (high - low), **percentiles([r[1] for r in rows]),
                "versions": sorted({r[3] for r in rows})}  # fmt: skip

    report = {
        "command": "python -m benchmarks.serving_reload " + " ".join(argv or sys.argv[1:]), "clients": args.clients,
        "promotion_to_first_new_answer_s": switched - promoted, "server_exit": code, "failed_total": sum(r[2] != 200 for r in results),
        "phases": [phase("before", began, promoted), phase("reload", promoted, switched), phase("after", switched, ended)],
        "load_average": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "serving_reload.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"promotion -> first v0002 answer: {report['promotion_to_first_new_answer_s']:.1f} s; failed requests: {report['failed_total']}; server exit {code}")
    print("| phase | seconds | requests | failed | req/s | p50 ms | p99 ms | versions |")
    for p in report["phases"]:
        print(f"| {p['phase']} | {p['seconds']:.1f} | {p['requests']} | {p['failed']} | {p['requests_per_s']:.1f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {', '.join(p['versions'])} |")


if __name__ == "__main__":
    main()
