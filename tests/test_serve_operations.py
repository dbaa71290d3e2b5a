"""``python -m pipelines.serve`` in operation: metrics, liveness/readiness, model identity, limits, drain on SIGTERM.

One real server process (a tiny untrained diffusion bundle: no training needed, and its seed
requests are slow enough to be in flight when the signal comes) answers real HTTP requests; the
last test drains it with a real SIGTERM. The image-header guard is checked on real PNG bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
import struct
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.domain_registry import get_domain
from pipelines.export import export_checkpoint
from pipelines.serving_metrics import LATENCY_BUCKETS
from tests.helpers import Server, metric_samples, request, start_server, tiny_diffusion

MAX_ITEMS = 6
DRAIN_DELAY = 1.0


def raw_request(url: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory) -> tuple[Server, Path]:
    """A diffusion bundle served one request at a time, with a small --max_items and a drain delay."""
    folder = tmp_path_factory.mktemp("ops")
    _, ckpt = tiny_diffusion(folder)
    bundle = export_checkpoint(get_domain("media"), ckpt, "onnx", folder / "bundle")
    served = start_server(
        "media", bundle, folder / "server.log", "--max_batch_size", "1", "--max_items", str(MAX_ITEMS),
        "--drain_delay", str(DRAIN_DELAY), "--model_name", "shapes-diffusion", "--model_version", "v7",
    )  # fmt: skip
    try:
        yield served, ckpt
    finally:
        served.kill()


def test_metrics_identity_liveness_and_readiness(diffusion):
    served, ckpt = diffusion
    sha256 = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert request(served.url + "/livez") == (200, "ok")
    assert request(served.url + "/readyz") == (200, "ready")
    status, info = request(served.url + "/info")
    assert status == 200 and (info["model"]["name"], info["model"]["version"], info["model"]["checkpoint_sha256"]) == ("shapes-diffusion", "v7", sha256)

    before = metric_samples(served.url)
    bodies = [b'{"seed": 0, "count": 3, "steps": 2}', b'{"seed": 1, "steps": 2}', b'{"seed": -1}', b'{"seed": 0', b"{}"]
    answers = [raw_request(served.url + "/predict", body) for body in bodies]
    assert [a[0] for a in answers] == [200, 200, 422, 400, 422], answers
    for status, headers, _ in answers:  # every answer, errors too, names the model
        assert (headers["x-model-name"], headers["x-model-version"], headers["x-model-checkpoint-sha256"]) == ("shapes-diffusion", "v7", sha256)

    after = metric_samples(served.url)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('pipelines_serve_requests_total{code="200"}') == 2
    assert grew('pipelines_serve_requests_total{code="422"}') == 2 and grew('pipelines_serve_errors_total{code="422"}') == 2
    assert grew('pipelines_serve_requests_total{code="400"}') == 1 and grew('pipelines_serve_errors_total{code="400"}') == 1
    assert 'pipelines_serve_errors_total{code="200"}' not in after
    assert grew("pipelines_serve_request_duration_seconds_count") == 5
    assert grew('pipelines_serve_request_duration_seconds_bucket{le="+Inf"}') == 5 and grew("pipelines_serve_request_duration_seconds_sum") > 0
    # the inference worker's samples (another process): 4 batches of one request (the invalid JSON never reaches it),
    # 2 decoded requests of 3 and 1 images
    assert grew("pipelines_serve_batch_size_count") == 4 and grew("pipelines_serve_batch_size_sum") == 4
    assert grew("pipelines_serve_request_items_count") == 2 and grew("pipelines_serve_request_items_sum") == 4
    assert grew('pipelines_serve_request_items_bucket{le="2.0"}') == 1
    info_metric = f'pipelines_serve_model_info{{checkpoint_sha256="{sha256}",domain="media",format="onnx",name="shapes-diffusion",version="v7"}}'
    assert after[info_metric] == 1, sorted(k for k in after if "model_info" in k)


def test_max_items_refuses_with_413_naming_the_option(diffusion):
    served, _ = diffusion
    status, answer = request(served.url + "/predict", {"seed": 0, "count": MAX_ITEMS + 1, "steps": 1})
    assert status == 413 and answer["detail"] == (
        f"seed: {MAX_ITEMS + 1} items in one request; this server takes at most {MAX_ITEMS} per request "
        f"(--max_items {MAX_ITEMS}): send them in several requests"
    ), answer
    status, answer = request(served.url + "/predict", {"seed": 0, "count": MAX_ITEMS, "steps": 1})
    assert status == 200 and len(answer["images"]) == MAX_ITEMS, answer


def test_generic_form_refuses_booleans_and_nan_naming_the_field(diffusion):
    served, _ = diffusion
    noisy = np.zeros((3, 8, 8)).tolist()
    good = {"noisy": noisy, "timestep": 3.0, "labels": 1}
    assert request(served.url + "/predict", {"inputs": good})[0] == 200
    with_bool = [[[True] + row[1:] for row in channel] for channel in noisy]
    cases = [
        ({**good, "noisy": with_bool}, "inputs.noisy: expected a float32 array of shape [3, 8, 8] of numbers; got true/false"),
        ({**good, "timestep": True}, "inputs.timestep: expected a float32 array of shape [] of numbers; got true/false"),
        ({**good, "labels": False}, "inputs.labels: expected a int64 array of shape [] of numbers; got true/false"),
    ]
    for inputs, want in cases:
        status, answer = request(served.url + "/predict", {"inputs": inputs})
        assert status == 422 and answer["detail"].startswith(want), (want, status, answer)
    nan = np.zeros((3, 8, 8))
    nan[1, 2, 5] = np.nan
    raw = ('{"inputs": {"noisy": %s, "timestep": NaN, "labels": 1}}' % nan.tolist()).replace("nan", "NaN").encode()
    status, _, body = raw_request(served.url + "/predict", raw)
    assert status == 422 and b'"inputs.noisy: expected finite numbers; got NaN at [1, 2, 5]"' in body, body
    raw = b'{"inputs": {"noisy": %s, "timestep": Infinity, "labels": 1}}' % str(noisy).encode()
    status, _, body = raw_request(served.url + "/predict", raw)
    assert status == 422 and b'"inputs.timestep: expected finite numbers; got inf"' in body, body


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header (signature, IHDR) claiming a huge grayscale image, with a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_read_image_refuses_oversized_images_from_the_header():
    import io

    from fastapi import HTTPException
    from PIL import Image

    from pipelines.serving_requests import read_image

    buffer = io.BytesIO()
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4)).save(buffer, "PNG")
    mode, pixels = read_image(buffer.getvalue(), "image_base64")
    assert mode == "L" and pixels.shape == (3, 4) and pixels[2, 3] == 11
    cases = [
        (png_claiming(5000, 5000), {}, 413, "image_base64: 5000x5000 pixels (width x height) is more than this server decodes (16777216 pixels)"),
        (png_claiming(20000, 20000), {}, 413, "image_base64: image too large to decode (Image size (400000000 pixels) exceeds limit"),
        (png_claiming(5, 4), {"max_pixels": 19}, 413, "image_base64: 5x4 pixels (width x height) is more than this server decodes (19 pixels)"),
        (b"GIF89a not really", {}, 400, "image_base64: not a readable PNG or JPEG image (UnidentifiedImageError)"),
        (png_claiming(4, 4)[:20], {}, 400, "image_base64: not a readable PNG or JPEG image"),
        (png_claiming(4, 4), {"formats": ("JPEG",)}, 400, "image_base64: expected a JPEG image; got PNG"),
    ]
    for raw, options, status, detail in cases:
        with pytest.raises(HTTPException) as refused:
            read_image(raw, "image_base64", **options)
        assert refused.value.status_code == status and refused.value.detail.startswith(detail), (detail, refused.value.detail)


def test_live_metrics_are_read_from_the_servers_prometheus_endpoint_and_logged_to_wandb(diffusion, tmp_path, monkeypatch, capsys):
    """pipelines.monitor_live on the real server: the interval's request rate, error share and latency quantiles match what
    was sent; the CLI logs exactly the names the dashboard's live panels use (LIVE_KEYS) to an offline W&B run."""
    from pipelines.monitor_live import LIVE_KEYS, live_metrics, main as live_main, read
    from tests.helpers import free_port
    from tests.wandb_offline import history

    served, _ = diffusion
    before = read(served.url)
    slowest = 0.0
    statuses = []
    for body in [b'{"seed": 0, "steps": 1}'] * 3 + [b'{"seed": -1}']:
        started = time.monotonic()
        statuses.append(raw_request(served.url + "/predict", body)[0])
        slowest = max(slowest, time.monotonic() - started)
    after = read(served.url)
    numbers = live_metrics(before, after)
    assert statuses == [200, 200, 200, 422] and numbers["serving/error_rate"] == 0.25 and numbers["serving/in_flight"] == 0
    assert numbers["serving/request_rate"] == pytest.approx(4 / (after.at - before.at))
    bound = min(b for b in (*LATENCY_BUCKETS, float("inf")) if b >= slowest)  # the server's latency is at most the client's
    assert 0 < numbers["serving/latency_p50"] <= numbers["serving/latency_p95"] <= numbers["serving/latency_p99"] <= bound, (numbers, slowest)

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # W&B's own setting: the offline run goes here, not into the checkout
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            raw_request(served.url + "/predict", b'{"seed": 0, "steps": 1}')

    thread = threading.Thread(target=client)
    thread.start()
    try:
        code = live_main([served.url, "--interval", "2", "--wandb", "--json", str(tmp_path / "live.json")])
    finally:
        stop.set()
        thread.join(60)
    out = capsys.readouterr().out
    assert code == 0 and "logged to W&B (offline" in out, out
    logged = json.loads((tmp_path / "live.json").read_text())
    assert logged["domain"] == "media" and logged["logged"]["serving/request_rate"] > 0 and logged["logged"]["serving/error_rate"] == 0
    (run,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert {k for row in history(run) for k in row if not k.startswith("_")} == set(LIVE_KEYS)
    assert live_main([f"http://127.0.0.1:{free_port()}", "--interval", "0.1"]) == 2
    assert "no answer" in capsys.readouterr().err


def test_sigterm_drains_requests_in_flight_and_exits_0(diffusion):
    """Requests in flight when SIGTERM comes are all answered; /readyz turns 503 while requests are still
    served for --drain_delay; then new connections are refused; the process exits 0."""
    served, _ = diffusion
    bodies = [{"seed": 10 * i, "count": 4, "steps": 100} for i in range(40)]  # served one at a time (--max_batch_size 1): seconds of work after SIGTERM
    answers: dict[int, tuple[int, Any, float]] = {}

    def client(i: int) -> None:
        status, answer = request(served.url + "/predict", bodies[i])
        answers[i] = (status, answer, time.monotonic())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while not answers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert answers, "no answer within 60 s"
    served.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    in_flight = len(bodies) - len(answers)
    assert in_flight >= 3, f"the requests finished too fast to test a drain ({len(answers)} answered before SIGTERM)"

    readiness = request(served.url + "/readyz")
    while readiness[0] == 200 and time.monotonic() < signalled + DRAIN_DELAY / 2:  # the signal is handled asynchronously
        readiness = request(served.url + "/readyz")
    assert readiness == (503, "draining")
    assert request(served.url + "/livez") == (200, "ok")
    refused_at = None
    while refused_at is None and time.monotonic() < signalled + DRAIN_DELAY + 10:
        try:
            socket.create_connection(("127.0.0.1", served.port), timeout=1).close()
            time.sleep(0.05)
        except OSError:
            refused_at = time.monotonic()
    assert refused_at is not None and refused_at >= signalled + DRAIN_DELAY - 0.05, "new connections must be refused after --drain_delay"
    for thread in threads:
        thread.join(120)
    assert [answers[i][0] for i in range(len(bodies))] == [200] * len(bodies), [answers[i][:2] for i in sorted(answers)]
    assert all(len(answers[i][1]["images"]) == 4 for i in answers)
    assert max(t for _, _, t in answers.values()) > refused_at, "requests in flight must be answered after the server stopped accepting"
    assert served.process.wait(60) == 0, served.output()
    log = served.output()
    assert "server stopped" in log and re.search(r"drained in \d+\.\d s", log), log
    assert "Traceback" not in log, log
