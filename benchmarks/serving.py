"""Serving benchmark: requests/s and p50/p99 latency of ``pipelines.serve`` per domain, beside plain loops.

``python -m benchmarks.serving [--domains healthcare ... media-diffusion] [--ckpt DOMAIN=CKPT ...] [--requests 200] [--concurrency 8]
[--diffusion-steps 50] [--diffusion-requests 48]``

For every domain whose model implements ``export_spec`` (others are listed as skipped): a checkpoint
(``--ckpt``, else a tiny model trained with the domain's ``test_args``) is exported to an ONNX
bundle and measured these ways, all on this machine's CPU:

- ``checkpoint loop``: the checkpoint's own inference module (PyTorch, pre/post-processing
  included, ``--torch-threads`` threads), one sample per call in a Python loop;
- ``bundle loop``: ``Bundle.run`` (onnxruntime) on one sample per call, in-process, no HTTP;
- ``server batch<=N``: ``python -m pipelines.serve`` on 127.0.0.1, ``--requests`` JSON requests
  (the generic form) from ``--concurrency`` client threads, with ``--max_batch_size N``;
- ``server batch<=1``: the same without batching;
- ``server batch<=N, <form> form``: the same samples in the domain's own request form (an image
  upload, a transaction row, a sequence of observations, a seed), decoding and answer included.

``media-diffusion`` (a media Diffusion model, default UNet, the test images' size) is measured per
generated image with ``--diffusion-steps`` DDIM steps and ``--diffusion-requests`` requests: the
checkpoint's own sampler (MONAI) in a loop, the numpy DDIM loop over ``Bundle.run``, and the server
answering ``{"seed": i, "steps": S}``.

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import print_table, write_results
from pipelines.domain_registry import available_domains, get_domain

ROOT = Path(__file__).resolve().parents[1]
DIFFUSION = "media-diffusion"  # the media domain with a Diffusion model (its default config trains a GAN)


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


def train_args(target: str) -> list[str]:
    """Runner options of a tiny model: the domain's test options; for ``media-diffusion`` those of the data and
    trainer with a Diffusion model (default UNet) and a cheap evaluation."""
    if target != DIFFUSION:
        return ["fit", *get_domain(target).test_args]
    keep = [a for a in get_domain("media").test_args if not a.startswith("--model.")]
    cheap = ("fid_samples=32", "grid_samples=8", "extractor_steps=2", "extractor_width=8", "eval_steps=2")
    return ["fit", *keep, "--model", "domains.media.model.Diffusion", *(f"--model.init_args.{c}" for c in cheap)]


def train_tiny(target: str, domain: str, workdir: Path) -> Path:
    """A tiny checkpoint trained by the runner (no data set needed)."""
    from pipelines.run import main as run

    runs = workdir / "runs"
    run([domain, *train_args(target), "--runs_dir", str(runs)])
    (run_dir,) = [p for p in (runs / domain).iterdir() if p.is_dir()]
    return run_dir / "checkpoints" / "last.ckpt"


def timed_loop(call: Callable[[Any], Any], items: list[Any], warmup: int = 5) -> dict[str, Any]:
    """Per-call latency of ``call(item)`` over ``items`` in a Python loop (after ``warmup`` untimed calls)."""
    for item in items[:warmup]:
        call(item)
    times = []
    for item in items:
        start = time.perf_counter()
        call(item)
        times.append(time.perf_counter() - start)
    return {"requests": len(times), "clients": 1, "requests_per_s": len(times) / sum(times), **percentiles(times), "errors": 0}


def checkpoint_loop(domain: str, ckpt: Path, samples: list[dict[str, np.ndarray]], threads: int) -> dict[str, Any]:
    """Per-call latency of the checkpoint's inference module in PyTorch (``threads`` intra-op threads), one sample per call."""
    import torch

    from pipelines.export import load_task

    torch.set_num_threads(threads)
    task, state, _ = load_task(get_domain(domain), ckpt)
    export = task.export_spec(state)
    module = export.module.eval()
    tensors = [[torch.from_numpy(s[n][None]) for n in export.input_names] for s in samples]
    with torch.no_grad():
        return timed_loop(lambda args: module(*args), tensors)


def bundle_loop(bundle_path: Path, samples: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Per-call latency of ``Bundle.run`` (onnxruntime) in this process, one sample per call."""
    from pipelines.bundle_runtime import Bundle

    bundle = Bundle(bundle_path)
    return timed_loop(lambda sample: bundle.run(**{n: v[None] for n, v in sample.items()}), samples)


def observation_rows(sample: dict[str, np.ndarray], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """An autonomous sample as the observations form: one object per step, positions named (forecasters) or as a list."""
    names = meta["target_names"] if meta["task"] == "forecasting" else None
    rows = []
    for past, channels in zip(sample["past"].tolist(), sample["channels"].tolist()):
        row: dict[str, Any] = dict(zip(names, past)) if names else {"position": past}
        rows.append(row | dict(zip(meta["channel_names"], channels)))
    return rows


def form_bodies(domain: str, metadata: dict[str, Any], samples: list[dict[str, np.ndarray]]) -> tuple[str, list[bytes]] | None:
    """The requests in the domain's own form (the form's name and the bodies), or None where the bundle has none."""
    meta = metadata["domain_metadata"]
    if domain == "healthcare" and len(meta.get("image_shape", [])) == 3:
        from domains.media.serving import to_png_base64

        return "image", [json.dumps({"image_base64": to_png_base64(s["image"])}).encode() for s in samples]
    if domain == "finance":
        from domains.finance.synthetic import make_card_transactions

        frame = make_card_transactions(len(samples), seed=1)
        text = frame.assign(timestamp=frame["timestamp"].astype(str)).astype(object)
        rows = text.where(text.notna(), None).to_dict("records")
        return "row", [json.dumps({"row": row}).encode() for row in rows]
    if domain == "autonomous":
        return "observations", [json.dumps({"observations": observation_rows(s, meta)}).encode() for s in samples]
    if domain == "media" and meta.get("model") == "GAN":
        return "seed", [json.dumps({"seed": i}).encode() for i in range(len(samples))]
    return None


def diffusion_loops(ckpt: Path, bundle_path: Path, seeds: list[int], steps: int, threads: int) -> dict[str, dict[str, Any]]:
    """Per-image latency of DDIM sampling: the checkpoint's MONAI sampler, and the numpy loop over ``Bundle.run``."""
    import torch

    from domains.media.serving import ddim_sample, ddim_schedule_for, seeded_noise_numpy
    from pipelines.bundle_runtime import Bundle
    from pipelines.export import load_task

    torch.set_num_threads(threads)
    task, _, _ = load_task(get_domain("media"), ckpt)
    bundle = Bundle(bundle_path)
    meta = bundle.metadata["domain_metadata"]
    classes = int(meta["num_classes"])
    inputs = {s: (seeded_noise_numpy([s], meta["noise_shape"]), np.array([s % classes]) if classes else None) for s in seeds}
    schedule = ddim_schedule_for(meta["scheduler"], steps)

    def checkpoint(seed: int) -> None:
        noise, labels = inputs[seed]
        with torch.no_grad():
            task.sample(torch.from_numpy(noise), None if labels is None else torch.from_numpy(labels), steps=steps, sampler="ddim")

    def bundled(seed: int) -> None:
        ddim_sample(lambda x: bundle.run(**x)["noise"], inputs[seed][0], schedule, inputs[seed][1])

    return {
        f"checkpoint loop (torch, {threads} thread, DDIM {steps} steps)": timed_loop(checkpoint, seeds, warmup=2),
        f"bundle loop (onnxruntime, numpy DDIM {steps} steps)": timed_loop(bundled, seeds, warmup=2),
    }


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
               "--max_batch_size", str(max_batch_size), "--batch_timeout", str(batch_timeout), "--log_level", "warning"]  # fmt: skip
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


def measure(target: str, domain: str, ckpt: Path, bundle_path: Path, workdir: Path, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """Every mode of one target (a domain, or ``media-diffusion``): mode name -> measured row."""
    metadata = json.loads((bundle_path / "metadata.json").read_text())
    batched = f"server batch<={args.max_batch_size}"

    def served(bodies: list[bytes], max_batch_size: int, batch_timeout: float, log: str) -> dict[str, Any]:
        return server_load(domain, bundle_path, bodies, args.concurrency, max_batch_size, batch_timeout, workdir / log)

    if target == DIFFUSION:
        seeds, steps = list(range(args.diffusion_requests)), args.diffusion_steps
        measured = diffusion_loops(ckpt, bundle_path, seeds, steps, args.torch_threads)
        bodies = [json.dumps({"seed": s, "steps": steps}).encode() for s in seeds]
        return measured | {f"{batched}, seed form, {steps} steps": served(bodies, args.max_batch_size, args.batch_timeout, "server-seed.log")}
    samples = [sample_inputs(metadata, rng) for _ in range(args.requests)]
    bodies = [json.dumps({"inputs": {n: v.tolist() for n, v in s.items()}}).encode() for s in samples]
    measured = {
        f"checkpoint loop (torch, {args.torch_threads} thread)": checkpoint_loop(domain, ckpt, samples, args.torch_threads),
        "bundle loop (onnxruntime)": bundle_loop(bundle_path, samples),
        f"{batched}, generic form": served(bodies, args.max_batch_size, args.batch_timeout, "server.log"),
        "server batch<=1, generic form": served(bodies, 1, 0.0, "server1.log"),
    }
    form = form_bodies(domain, metadata, samples)
    if form is not None:
        measured[f"{batched}, {form[0]} form"] = served(form[1], args.max_batch_size, args.batch_timeout, "server-form.log")
    return measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="*", default=None, help=f"default: every registered domain and {DIFFUSION}")
    parser.add_argument("--ckpt", action="append", default=[], metavar="DOMAIN=CKPT", help="checkpoint to export (default: a tiny trained one)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--batch_timeout", type=float, default=0.01)
    parser.add_argument("--diffusion-steps", type=int, default=50, help=f"DDIM steps per image of {DIFFUSION}")
    parser.add_argument("--diffusion-requests", type=int, default=48, help=f"images (one per request) of {DIFFUSION}")
    parser.add_argument(
        "--torch-threads", type=int, default=1,
        help="intra-op threads of the checkpoint loop (on a busy 2-core machine 2 OpenMP threads run 5-25x slower than 1)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    ckpts = dict(item.split("=", 1) for item in args.ckpt)
    targets = args.domains or [*available_domains(), DIFFUSION]
    from pipelines.export import export_checkpoint
    from pipelines.task import BaseTask

    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        for target in targets:
            domain = "media" if target == DIFFUSION else target
            model_class = get_domain(domain).load_model_class()
            if model_class.export_spec is BaseTask.export_spec:
                skipped[target] = f"{model_class.__qualname__} does not implement export_spec() (no bundle)"
                print(f"[serving] skipping {target}: {skipped[target]}", flush=True)
                continue
            workdir = Path(tmp) / target
            workdir.mkdir()
            ckpt = Path(ckpts[target]) if target in ckpts else train_tiny(target, domain, workdir)
            bundle_path = export_checkpoint(get_domain(domain), ckpt, "onnx", workdir / "bundle")
            shape = {spec["name"]: spec["shape"] for spec in json.loads((bundle_path / "metadata.json").read_text())["inputs"]}
            for mode, row in measure(target, domain, ckpt, bundle_path, workdir, args, rng).items():
                results.append({"domain": target, "mode": mode, "checkpoint": str(ckpt) if target in ckpts else "tiny (test_args)", "inputs": shape, **row})
                rows.append([target, mode, row["requests"], row["clients"], row["requests_per_s"], row["p50_ms"], row["p99_ms"], row["errors"]])
            print(f"[serving] {target} measured (load average {os.getloadavg()[0]:.1f})", flush=True)
    print()
    print_table(["domain", "mode", "requests", "clients", "req/s", "p50 ms", "p99 ms", "errors"], rows)
    for target, reason in skipped.items():
        print(f"skipped {target}: {reason}")
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
