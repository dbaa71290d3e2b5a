"""Serving benchmark: requests/s and p50/p99 latency of ``pipelines.serve`` per domain, beside plain loops.

``python -m benchmarks.serving [--domains healthcare ...] [--ckpt DOMAIN=CKPT ...] [--requests 200] [--concurrency 8]``

For every domain whose model implements ``export_spec`` (others are listed as skipped): a checkpoint
(``--ckpt``, else a tiny model trained with the domain's ``test_args``) is exported to an ONNX
bundle and measured four ways, all on this machine's CPU:

- ``checkpoint loop``: the checkpoint's own inference module (PyTorch, pre/post-processing
  included, ``--torch-threads`` threads), one sample per call in a Python loop;
- ``bundle loop``: ``Bundle.run`` (onnxruntime) on one sample per call, in-process, no HTTP;
- ``server batch<=N``: ``python -m pipelines.serve`` on 127.0.0.1, ``--requests`` JSON requests
  (the generic form) from ``--concurrency`` client threads, with ``--max-batch-size N``;
- ``server batch<=1``: the same without batching.

Latencies are per request (per call for the loops); requests/s is requests over wall time.
Needs no data set. Prints a table and writes ``benchmarks/results/serving.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import print_table, write_results
from pipelines.registry import available_domains, get_domain

ROOT = Path(__file__).resolve().parents[1]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def sample_inputs(metadata: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One random sample per input (named axes get size 8)."""
    inputs = {}
    for spec in metadata["inputs"]:
        shape = [8 if not isinstance(s, int) else s for s in spec["shape"][1:]]
        floats = "float" in spec["dtype"]
        inputs[spec["name"]] = (rng.random(shape) if floats else rng.integers(0, 2, shape)).astype(spec["dtype"])
    return inputs


def train_tiny(domain: str, workdir: Path) -> Path:
    """A tiny checkpoint trained with the domain's test options (no data set needed)."""
    from pipelines.run import main as run

    runs = workdir / "runs"
    run([domain, "fit", *get_domain(domain).test_args, "--runs_dir", str(runs)])
    (run_dir,) = [p for p in (runs / domain).iterdir() if p.is_dir()]
    return run_dir / "checkpoints" / "last.ckpt"


def checkpoint_loop(domain: str, ckpt: Path, samples: list[dict[str, np.ndarray]], threads: int) -> dict[str, Any]:
    """Per-call latency of the checkpoint's inference module in PyTorch (``threads`` intra-op threads), one sample per call."""
    import torch

    from pipelines.export import load_task

    torch.set_num_threads(threads)

    task, state, _ = load_task(get_domain(domain), ckpt)
    export = task.export_spec(state)
    module = export.module.eval()
    tensors = [[torch.from_numpy(s[n][None]) for n in export.input_names] for s in samples]
    times = []
    with torch.no_grad():
        for args in tensors[:5]:
            module(*args)
        for args in tensors:
            start = time.perf_counter()
            module(*args)
            times.append(time.perf_counter() - start)
    return {"requests": len(times), "clients": 1, "requests_per_s": len(times) / sum(times), **percentiles(times), "errors": 0}


def bundle_loop(bundle_path: Path, samples: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Per-call latency of ``Bundle.run`` (onnxruntime) in this process, one sample per call."""
    from pipelines.bundle_runtime import Bundle

    bundle = Bundle(bundle_path)
    times = []
    for sample in samples[:5]:
        bundle.run(**{n: v[None] for n, v in sample.items()})
    for sample in samples:
        start = time.perf_counter()
        bundle.run(**{n: v[None] for n, v in sample.items()})
        times.append(time.perf_counter() - start)
    return {"requests": len(times), "clients": 1, "requests_per_s": len(times) / sum(times), **percentiles(times), "errors": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def server_load(domain: str, bundle_path: Path, bodies: list[bytes], concurrency: int, max_batch_size: int, batch_timeout: float, log: Path) -> dict[str, Any]:
    """Start the server, send ``bodies`` from ``concurrency`` threads, stop it with SIGTERM."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pipelines.serve", domain, "--bundle", str(bundle_path), "--port", str(port),
               "--max-batch-size", str(max_batch_size), "--batch-timeout", str(batch_timeout), "--log-level", "warning"]  # fmt: skip
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        for body in bodies[:concurrency]:
            post(url + "/predict", body)

        def timed(body: bytes) -> tuple[int, float]:
            start = time.perf_counter()
            status = post(url + "/predict", body)
            return status, time.perf_counter() - start

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(timed, bodies))
        wall = time.perf_counter() - start
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    times = [t for _, t in results]
    errors = sum(status != 200 for status, _ in results)
    return {"requests": len(bodies), "clients": concurrency, "requests_per_s": len(bodies) / wall, **percentiles(times), "errors": errors}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="*", default=None, help="default: every registered domain")
    parser.add_argument("--ckpt", action="append", default=[], metavar="DOMAIN=CKPT", help="checkpoint to export (default: a tiny trained one)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument(
        "--torch-threads", type=int, default=1,
        help="intra-op threads of the checkpoint loop (on a busy 2-core machine 2 OpenMP threads run 5-25x slower than 1)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    ckpts = dict(item.split("=", 1) for item in args.ckpt)
    domains = args.domains or available_domains()
    from pipelines.export import export_checkpoint
    from pipelines.task import BaseTask

    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        for domain in domains:
            model_class = get_domain(domain).load_model_class()
            if model_class.export_spec is BaseTask.export_spec:
                skipped[domain] = f"{model_class.__qualname__} does not implement export_spec() (no bundle)"
                print(f"[serving] skipping {domain}: {skipped[domain]}", flush=True)
                continue
            workdir = Path(tmp) / domain
            workdir.mkdir()
            ckpt = Path(ckpts[domain]) if domain in ckpts else train_tiny(domain, workdir)
            bundle_path = export_checkpoint(get_domain(domain), ckpt, "onnx", workdir / "bundle")
            metadata = json.loads((bundle_path / "metadata.json").read_text())
            samples = [sample_inputs(metadata, rng) for _ in range(args.requests)]
            bodies = [json.dumps({"inputs": {n: v.tolist() for n, v in s.items()}}).encode() for s in samples]
            measured = {
                f"checkpoint loop (torch, {args.torch_threads} thread)": checkpoint_loop(domain, ckpt, samples, args.torch_threads),
                "bundle loop (onnxruntime)": bundle_loop(bundle_path, samples),
                f"server batch<={args.max_batch_size}": server_load(
                    domain, bundle_path, bodies, args.concurrency, args.max_batch_size, args.batch_timeout, workdir / "server.log"
                ),
                "server batch<=1": server_load(domain, bundle_path, bodies, args.concurrency, 1, 0.0, workdir / "server1.log"),
            }
            shape = {spec["name"]: spec["shape"] for spec in metadata["inputs"]}
            for mode, row in measured.items():
                results.append({"domain": domain, "mode": mode, "checkpoint": str(ckpt) if domain in ckpts else "tiny (test_args)", "inputs": shape, **row})
                rows.append([domain, mode, row["requests"], row["clients"], row["requests_per_s"], row["p50_ms"], row["p99_ms"], row["errors"]])
    print()
    print_table(["domain", "mode", "requests", "clients", "req/s", "p50 ms", "p99 ms", "errors"], rows)
    for domain, reason in skipped.items():
        print(f"skipped {domain}: {reason}")
    write_results(
        "serving",
        {
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
            "settings": vars(args),
            "rows": results,
            "skipped": skipped,
        },
    )


if __name__ == "__main__":
    main()
