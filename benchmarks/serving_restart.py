"""Rolling-restart benchmark: two ``pipelines.serve`` replicas restarted one after the other under load, requests lost 0.

``python -m benchmarks.serving_restart [--clients 8] [--settle 3] [--retries 5]``

A tiny finance model (the domain's ``test_args``) is exported and served by two replicas on two
ports. ``--clients`` threads send generic-form requests without pause through a client-side policy
like a load balancer's: round-robin over the replicas, and a request that gets no answer (connection
refused or reset) or a 503 (draining) is retried on the other replica, up to ``--retries`` times with
a 50 ms pause. Meanwhile each replica in turn gets SIGTERM (graceful drain: in-flight requests are
answered, then exit 0), is started again on the same port, and is waited for (``/readyz``) before the
next one goes; ``--settle`` seconds of load before, between and after. Reported: requests, requests
lost (no 200 after the retries), retried requests, p50/p99 latency, the replicas' exit codes.
Prints a table and writes ``benchmarks/results/serving_restart.json``.
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

from benchmarks.serving import ROOT, free_port, percentiles, post, train_tiny
from pipelines.domain_registry import get_domain


def start(bundle: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipelines.serve", "finance", "--bundle", str(bundle), "--port", str(port), "--log_level", "warning"]
    with open(log, "ab") as handle:
        return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=handle, stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of load before, between and after the restarts")
    parser.add_argument("--retries", type=int, default=5, help="retries of a request on the other replica (client policy)")
    args = parser.parse_args(argv)
    from pipelines.export import export_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    bundle = export_checkpoint(get_domain("finance"), train_tiny("finance", "finance", work), "onnx", work / "bundle")
    spec = json.loads((bundle / "metadata.json").read_text())["inputs"][0]
    body = json.dumps({"inputs": {spec["name"]: [0.1] * spec["shape"][1]}}).encode()
    ports = [free_port(), free_port()]
    logs = [work / f"replica{i}.log" for i in range(2)]
    replicas = [start(bundle, port, log) for port, log in zip(ports, logs)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    for url, process, log in zip(urls, replicas, logs):
        wait_ready(url, process, log)
    results: list[tuple[float, int, int]] = []  # latency, final status, attempts
    stop, turn = threading.Event(), iter(range(10**12))

    def client() -> None:
        while not stop.is_set():
            first, began = next(turn) % 2, time.monotonic()
            for attempt in range(args.retries + 1):
                try:
                    status = post(urls[(first + attempt) % 2] + "/predict", body)
                except OSError:  # refused, reset, closed mid-answer: not answered
                    status = -1
                if status not in (-1, 503):
                    break
                time.sleep(0.05)
            results.append((time.monotonic() - began, status, attempt + 1))

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    exits = []
    time.sleep(args.settle)
    for i in range(2):  # the rolling restart
        replicas[i].send_signal(signal.SIGTERM)
        exits.append(replicas[i].wait(120))
        replicas[i] = start(bundle, ports[i], logs[i])
        wait_ready(urls[i], replicas[i], logs[i])
        time.sleep(args.settle)
    stop.set()
    for thread in threads:
        thread.join(120)
    for process in replicas:
        process.send_signal(signal.SIGTERM)
        exits.append(process.wait(120))
    report = {
        "command": "python -m benchmarks.serving_restart " + " ".join(argv or sys.argv[1:]), "clients": args.clients, "retries": args.retries,
        "requests": len(results), "lost": sum(r[1] != 200 for r in results), "retried": sum(r[2] > 1 for r in results),
        **percentiles([r[0] for r in results]), "replica_exits": exits, "load_average": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "serving_restart.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| requests | lost | retried | p50 ms | p99 ms | replica exits |")
    print(f"| {report['requests']} | {report['lost']} | {report['retried']} | {report['p50_ms']:.1f} | {report['p99_ms']:.1f} | {exits} |")


if __name__ == "__main__":
    main()
