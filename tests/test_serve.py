"""``python -m pipelines.serve``: the real server in a child process on 127.0.0.1, real HTTP requests.

For every registered domain whose model implements ``export_spec``: the domain's tiny run (trained
once per session, tests/conftest.py) is exported (ONNX), the server is started on a free loopback
port, and good requests (answers equal to ``Bundle.run`` on the same inputs), malformed requests
(4xx naming the field), concurrent requests (batched, a malformed one never failing the others), the health/info endpoints and a
clean SIGTERM shutdown are checked. Healthcare also gets its image-upload form. Autonomous gets its
observations/sequences forms (forecasts timed by the bundle's time step, malformed sequences refused
naming sequence, row and channel; bundles exported before position names and time steps were recorded
still answered as before). Bundles with servers of their own (TorchScript, autonomous classification
and regression, diffusion): tests/test_serve_bundles.py.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.domain_registry import available_domains, get_domain
from pipelines.export import export_checkpoint
from tests.helpers import REQUEST_TIMEOUT, request, start_server
from tests.serving_checks import (
    ATOL, CHECKPOINT_ATOL, assert_matches_bundle, autonomous_test_batch, bundle_outputs, forecast_array, observations, random_sample,
    require_export_spec, served_answer, without_position_names_and_time_step,
)  # fmt: skip

DOMAINS = available_domains()


def child_pids(pid: int) -> set[int]:
    """All descendants of a process (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
        for child in children - found:
            found |= {child} | child_pids(child)
    return found


def running(pids: set[int]) -> set[int]:
    """The processes of ``pids`` that still exist and are not zombies."""
    alive = set()
    for pid in pids:
        try:
            if "zombie" not in Path(f"/proc/{pid}/status").read_text().lower():
                alive.add(pid)
        except OSError:
            pass
    return alive


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on a TCP port."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                addresses.add(address)
    return addresses


@pytest.fixture(scope="module")
def trained(tiny_run):
    """``trained(domain)``: the last checkpoint of the domain's tiny run (tests/conftest.py: trained once per session)."""
    return lambda domain: tiny_run(domain) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module", params=DOMAINS)
def server(request, trained, tmp_path_factory):
    """The domain's ONNX bundle served on a free loopback port (stopped, at the latest, after the module)."""
    domain = request.param
    require_export_spec(domain)
    folder = tmp_path_factory.mktemp(f"{domain}-serve")
    bundle = export_checkpoint(get_domain(domain), trained(domain), "onnx", folder / "bundle")
    served = start_server(domain, bundle, folder / "server.log", "--max_batch_size", "16", "--batch_timeout", "0.05", "--log_level", "debug", "--max_payload_mb", "1")
    try:
        yield served
        if served.process.poll() is None:  # a test failed before the shutdown test
            served.stop(signal.SIGTERM)
    finally:
        served.kill()  # it and every process it started (its group), also when the shutdown test failed


def test_health_info_and_loopback_only(server):
    assert request(server.url + "/health") == (200, "ok")
    status, info = request(server.url + "/info")
    assert status == 200 and info["model"]["domain"] == server.domain and info["model"]["format"] == "onnx"
    assert "generic" in info["model"]["request_forms"]
    assert listening_addresses(server.port) == {"0100007F"}, "the server must listen on 127.0.0.1 only"


def test_generic_request_matches_bundle(server):
    metadata = json.loads((server.bundle / "metadata.json").read_text())
    rng = np.random.default_rng(1)
    for _ in range(2):
        inputs = {spec["name"]: random_sample(spec, rng) for spec in metadata["inputs"]}
        status, answer = request(server.url + "/predict", {"inputs": {n: v.tolist() for n, v in inputs.items()}})
        assert status == 200, answer
        assert_matches_bundle(answer, bundle_outputs(server.bundle, inputs))


def malformed_requests(metadata: dict[str, Any]) -> list[tuple[str, bytes, str, int, str]]:
    """(what, body, content type, expected status, text the error must contain)."""
    spec = metadata["inputs"][0]
    name = spec["name"]
    good = random_sample(spec, np.random.default_rng(2))
    others = {s["name"]: random_sample(s, np.random.default_rng(3)).tolist() for s in metadata["inputs"][1:]}

    def body(inputs: Any, **extra: Any) -> bytes:
        return json.dumps({"inputs": inputs, **extra}).encode()

    wrong_rank = good[..., None] if good.ndim else np.array([good])
    nan = good.astype(np.float64).copy()
    nan.flat[0] = math.nan
    cases = [
        ("invalid JSON", b'{"inputs": ', "application/json", 400, "not valid JSON"),
        ("a JSON list", b"[1, 2]", "application/json", 422, "expected a JSON object"),
        ("not JSON content", b"inputs=1", "application/x-www-form-urlencoded", 422, "Content-Type: application/json"),
        ("no known form", b'{"pixels": [1]}', "application/json", 422, "pixels: no request form"),
        ("empty object", b"{}", "application/json", 422, "body: empty request"),
        ("inputs not an object", body([1, 2]), "application/json", 422, "inputs: expected an object"),
        ("missing input", body(others), "application/json", 422, f"inputs.{name}: missing"),
        ("unknown input", body({name: good.tolist(), **others, "extra": [1]}), "application/json", 422, "inputs.extra: unknown input"),
        ("unexpected top-level field", body({name: good.tolist(), **others}, debug=True), "application/json", 422, "debug: unexpected field"),
        ("wrong rank", body({name: wrong_rank.tolist(), **others}), "application/json", 422, f"inputs.{name}: expected a {spec['dtype']} array of shape"),
        ("strings", body({name: np.full(good.shape, "x").tolist(), **others}), "application/json", 422, f"inputs.{name}: expected"),
        ("over --max_payload_mb", body({name: good.tolist(), **others}) + b" " * 2**20, "application/json", 413, "Payload too large"),
        ("ragged lists", body({name: [[1.0], [1.0, 2.0]], **others}), "application/json", 422, f"inputs.{name}: expected"),
    ]
    if "float" in spec["dtype"]:
        nan_body = json.dumps({"inputs": {name: nan.tolist(), **others}}).encode()  # Python writes NaN, which the server parses
        cases.append(("NaN", nan_body, "application/json", 422, f"inputs.{name}: expected finite numbers; got NaN at"))
    if "range" in spec:  # e.g. 0-255 pixels for a model of [0, 1] intensities (trial finding: a confident class)
        pixels = (good * 255).round()
        cases.append(("outside the range", body({name: pixels.tolist(), **others}), "application/json", 422, f"inputs.{name}: values must lie in [0, 1]"))
    return cases


def test_malformed_requests_get_4xx_naming_the_field(server):
    metadata = json.loads((server.bundle / "metadata.json").read_text())
    for what, raw, content_type, want_status, want_text in malformed_requests(metadata):
        status, answer = request(server.url + "/predict", raw=raw, content_type=content_type)
        assert status == want_status, f"{what}: got {status} {answer}"
        assert isinstance(answer, dict) and want_text in answer["detail"], f"{what}: {answer}"
    assert request(server.url + "/predict")[0] == 405  # GET on the predict endpoint
    assert request(server.url + "/nowhere")[0] == 404
    # the server is still healthy and answers good requests after all of them
    rng = np.random.default_rng(4)
    inputs = {spec["name"]: random_sample(spec, rng) for spec in metadata["inputs"]}
    status, answer = request(server.url + "/predict", {"inputs": {n: v.tolist() for n, v in inputs.items()}})
    assert status == 200, answer
    assert_matches_bundle(answer, bundle_outputs(server.bundle, inputs))


def test_concurrent_requests_are_batched_and_all_answered(server):
    metadata = json.loads((server.bundle / "metadata.json").read_text())
    rng = np.random.default_rng(5)
    samples = [{spec["name"]: random_sample(spec, rng) for spec in metadata["inputs"]} for _ in range(32)]
    bad = set(range(3, 32, 8))  # a few malformed requests travel in the same batches
    answers: dict[int, tuple[int, Any]] = {}
    barrier = threading.Barrier(len(samples))

    def client(i: int) -> None:
        payload = {"inputs": {n: v.tolist() for n, v in samples[i].items()}}
        if i in bad:
            payload = {"inputs": {}}
        barrier.wait(timeout=30)
        answers[i] = request(server.url + "/predict", payload)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(samples))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT + 30)
    assert sorted(answers) == list(range(len(samples))), "every request must be answered"
    for i, (status, answer) in answers.items():
        if i in bad:
            assert status == 422 and "missing" in answer["detail"], answer
        else:
            assert status == 200, (i, answer)
            assert_matches_bundle(answer, bundle_outputs(server.bundle, samples[i]))
    sizes = [int(n) for n in re.findall(r"batch of (\d+) request", server.log.read_text(errors="replace"))]
    assert sizes and max(sizes) > 1, f"concurrent requests were never batched (batch sizes {sizes})"


def png_or_jpeg(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_healthcare_image_upload(server):
    if server.domain != "healthcare":
        pytest.skip("the image-upload form is healthcare's")
    metadata = json.loads((server.bundle / "metadata.json").read_text())
    channels, height, width = metadata["domain_metadata"]["image_shape"]
    assert channels == 1, "the tiny synthetic healthcare data set is grayscale"
    names = metadata["domain_metadata"]["class_names"]
    pixels = np.random.default_rng(6).integers(0, 256, (height, width), dtype=np.uint8)
    expected = bundle_outputs(server.bundle, {"image": (pixels.astype(np.float32) / 255)[None]})["probabilities"][0]
    for image in (png_or_jpeg(pixels), "data:image/png;base64," + png_or_jpeg(pixels)):
        status, answer = request(server.url + "/predict", {"image_base64": image})
        assert status == 200, answer
        assert list(answer["probabilities"]) == names and answer["prediction"] == names[int(np.argmax(expected))]
        np.testing.assert_allclose([answer["probabilities"][n] for n in names], expected, atol=ATOL)
    status, answer = request(server.url + "/predict", {"image_base64": png_or_jpeg(pixels, "JPEG")})
    assert status == 200 and set(answer["probabilities"]) == set(names), answer

    small = pixels[: height // 2, : width // 2].copy()
    rgb = np.stack([pixels] * 3, axis=-1)
    cases = [
        ({"image_base64": png_or_jpeg(small)}, 422, f"expected {height}x{width} pixels"),
        ({"image_base64": png_or_jpeg(rgb)}, 422, "expected a grayscale (L) image"),
        ({"image_base64": png_or_jpeg(np.zeros_like(pixels))}, 422, "image_base64: every pixel holds the same value (0): a blank image"),
        ({"image_base64": "not base64!"}, 400, "image_base64: not valid base64"),
        ({"image_base64": base64.b64encode(b"GIF89a not really").decode()}, 400, "image_base64: not a readable PNG or JPEG"),
        ({"image_base64": 7}, 422, "image_base64: expected a non-empty base64 string"),
        ({"image_base64": png_or_jpeg(pixels), "threshold": 0.3}, 422, "threshold: unexpected field"),
    ]
    for payload, want_status, want_text in cases:
        status, answer = request(server.url + "/predict", payload)
        assert status == want_status and want_text in answer["detail"], (want_text, status, answer)


# ----- autonomous: sequences of named observations ---------------------------------------------
@pytest.mark.parametrize("server", ["autonomous"], indirect=True)
def test_autonomous_observations_match_the_checkpoint(server, trained):
    import torch

    task, batch, settings = autonomous_test_batch(trained("autonomous"))
    names, channel_names = settings["target_channels"], settings["channels"]
    with torch.no_grad():
        expected = task._predictions(batch)["single"].numpy()  # what `pipelines.run autonomous predict` writes
    windows = 4
    dt, observe = settings["sim_dt"], settings["observe"]
    times = batch["time"][:, None].numpy() + dt * np.arange(-observe + 1, 1)
    rows = observations(batch["past"][0], batch["channels"][0], channel_names, names, times[0])
    older = [{**rows[0], "time": rows[0]["time"] - dt * k, "x": 1e6} for k in (2, 1)]  # checked, but not read: the model reads the last `observe`
    metadata = json.loads((server.bundle / "metadata.json").read_text())["domain_metadata"]
    assert metadata["position_names"] == names and metadata["time_step"] == dt  # the simulator samples every sim_dt
    status, answer = request(server.url + "/predict", {"observations": older + rows})
    assert status == 200, answer
    np.testing.assert_allclose(forecast_array(answer, names), expected[0], atol=CHECKPOINT_ATOL, rtol=1e-5)
    ahead = dt * np.arange(1, settings["predict"] + 1)
    assert [s["step"] for s in answer["forecast"]] == list(range(1, settings["predict"] + 1))
    np.testing.assert_allclose([s["ahead"] for s in answer["forecast"]], ahead, rtol=1e-9)
    np.testing.assert_allclose([s["time"] for s in answer["forecast"]], times[0, -1] + ahead, rtol=1e-9)

    # untimed requests still get each step's offset; positions named, or as one list (sequence 1)
    sequences = [observations(batch["past"][i], batch["channels"][i], channel_names, None if i == 1 else names) for i in range(windows)]
    status, answer = request(server.url + "/predict", {"sequences": sequences})
    assert status == 200 and len(answer["predictions"]) == windows, answer
    for i, prediction in enumerate(answer["predictions"]):
        assert "time" not in prediction["forecast"][0]
        np.testing.assert_allclose([s["ahead"] for s in prediction["forecast"]], ahead, rtol=1e-9)
        np.testing.assert_allclose(forecast_array(prediction, names), expected[i], atol=CHECKPOINT_ATOL, rtol=1e-5)
    assert "observations" in request(server.url + "/info")[1]["model"]["request_forms"]


@pytest.mark.parametrize("server", ["autonomous"], indirect=True)
def test_autonomous_malformed_observations_get_422_naming_the_field(server):
    metadata = json.loads((server.bundle / "metadata.json").read_text())["domain_metadata"]
    observe, channels = metadata["observe"], metadata["channel_names"]
    good = [{"time": 0.25 * t, "x": 2.0 * t, "y": 0.5, **{c: 1.0 for c in channels}} for t in range(observe + 1)]
    first = channels[0]

    def changed(index: int, **fields: Any) -> list[dict[str, Any]]:
        return [{**row, **fields} if i == index else row for i, row in enumerate(good)]

    without = [{k: v for k, v in row.items() if k != first} if i == 3 else row for i, row in enumerate(good)]
    untimed = [{k: v for k, v in row.items() if k != "time"} if i == 2 else row for i, row in enumerate(good)]
    nan_body = json.dumps({"observations": changed(4, **{first: math.nan})}).encode()  # Python writes NaN, which the server parses
    cases = [
        ({"observations": good[: observe - 1]}, f"observations: {observe - 1} observation(s); this model reads the last {observe}"),
        ({"observations": without}, f"observations[3].{first}: missing channel"),
        ({"observations": changed(1, **{first: "fast"})}, f"observations[1].{first}: expected a number; got 'fast'"),
        ({"observations": changed(1, **{first: True})}, f"observations[1].{first}: expected a number; got True"),
        ({"observations": changed(2, y=[0.5, 0.5])}, "observations[2].y: expected a number"),
        ({"observations": changed(0, x=1e39)}, "observations[0].x: expected a finite number within the float32 range"),
        ({"observations": changed(5, heading=1.0)}, "observations[5].heading: unknown field"),
        ({"observations": untimed}, "observations[2].time: give 'time' in every observation or in none"),
        ({"observations": changed(3, time=0.0)}, "observations[3].time: 0 is not after the previous observation's time 0.5"),
        ({"observations": [{**row, "time": 250.0 * t} for t, row in enumerate(good)]},
         f"observations: the last {observe} observations are 250 apart in 'time' (median); this model was trained on data sampled every 0.25"),
        ({"observations": [{**row, "time": row["time"] + (1.0 if i >= observe - 2 else 0.0)} for i, row in enumerate(good)]},  # a gap the model would read
         f"observations[{observe - 2}].time: {0.25 * (observe - 2) + 1.0:g} is 5 time steps after the previous observation"),
        ({"observations": changed(1, position=[1.0, 2.0])}, "observations[1].x: positions given twice"),
        ({"observations": [{k: v for k, v in row.items() if k not in ("x", "y")} | {"position": [1.0]} for row in good]},
         "observations[0].position: expected a list of 2 numbers (['x', 'y'], in that order)"),
        ({"observations": [*good[:2], 7, *good[2:]]}, "observations[2]: expected an object"),
        ({"observations": {"x": 1}}, "observations: expected a list of observations"),
        ({"observations": good, "horizon": 3}, "horizon: unexpected field"),
        ({"sequences": [good, good[:2]]}, "sequences[1]: 2 observation(s)"),
        ({"sequences": [good, changed(0, x=None)]}, "sequences[1][0].x: expected a number; got None"),
        ({"sequences": []}, "sequences: expected a list of sequences"),
    ]
    for body, want in cases:
        status, answer = request(server.url + "/predict", body)
        assert status == 422 and answer["detail"].startswith(want), (want, status, answer)
    status, answer = request(server.url + "/predict", raw=nan_body)
    assert status == 422 and answer["detail"].startswith(f"observations[4].{first}: expected a finite number"), answer
    older_gap = [{**row, "time": row["time"] + (1.0 if i >= 1 else 0.0)} for i, row in enumerate(good)]  # before the observations read: not used
    status, answer = request(server.url + "/predict", {"observations": older_gap})
    assert status == 200, answer


@pytest.mark.parametrize("server", ["autonomous"], indirect=True)
def test_autonomous_forecaster_bundle_without_time_step_serves_as_before(server):
    """No ``time_step`` recorded: steps are timed only from request times (their median step, unchecked); positions by target_names."""
    from domains.autonomous.serving import ObservationsAdapter

    metadata = without_position_names_and_time_step(server.bundle)
    adapter = ObservationsAdapter(metadata)
    domain = metadata["domain_metadata"]
    rows = [{"x": 2.0 * t, "y": 0.5, **{c: 1.0 for c in domain["channel_names"]}} for t in range(domain["observe"])]
    untimed = served_answer(adapter, server.bundle, {"observations": rows})
    assert set(untimed["forecast"][0]) == {"step", "x", "y"}, untimed
    timed = served_answer(adapter, server.bundle, {"observations": [{"time": 10.0 + 0.5 * t, **row} for t, row in enumerate(rows)]})
    assert [(s["ahead"], s["time"]) for s in timed["forecast"][:2]] == [(0.5, 14.0), (1.0, 14.5)], timed
    assert [s["x"] for s in timed["forecast"]] == [s["x"] for s in untimed["forecast"]]


def test_sigterm_stops_cleanly(server):
    children = child_pids(server.process.pid)
    assert children, "LitServe runs its HTTP and inference workers as child processes"
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=20) == 0, server.output()
    assert time.monotonic() - started < 20
    deadline = time.monotonic() + 10  # the resource tracker exits once it sees its pipe closed
    while (alive := running(children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"child processes left running after shutdown: {alive}"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    assert "server stopped" in server.output()


