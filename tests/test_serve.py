"""``python -m pipelines.serve``: the real server in a child process on 127.0.0.1, real HTTP requests.

For every registered domain whose model implements ``export_spec``: the domain's tiny run (trained
once per session, tests/conftest.py) is exported (ONNX), the server is started on a free loopback
port, and good requests (answers equal to ``Bundle.run`` on the same inputs), malformed requests
(4xx naming the field), concurrent requests (batched, a malformed one never failing the others), the health/info endpoints and a
clean SIGTERM shutdown are checked. Healthcare also gets its image-upload form, a TorchScript
bundle and a SIGINT shutdown. Autonomous gets its observations/sequences forms (forecasts timed by
the bundle's time step and, with classification and regression models of their own, class
probabilities and values equal to the checkpoint's within ``CHECKPOINT_ATOL``, positions named or
as a list; malformed sequences refused naming sequence, row and channel; bundles exported before
position names and time steps were recorded still answered as before), and a tiny
diffusion model its server-side DDIM sampling (images equal to the checkpoint's sampler to 1/255).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.domain_registry import available_domains, get_domain
from pipelines.export import export_checkpoint
from pipelines.task import BaseTask
from tests.conftest import ROOT, child_env, only_run, run_pipeline
from tests.helpers import REQUEST_TIMEOUT, decode_pngs, free_port, request, start_server, tiny_diffusion
from tests.processes import child_process

DOMAINS = available_domains()
ATOL = 1e-5  # the server runs the same bundle; only batch composition may change the last bits
# the classification and regression forecasters' own tiny runs: the domain's test options, one batch of each stage, no test stage
FAST = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1")


def require_export_spec(domain: str) -> None:
    """Skip (with the reason) a domain whose model cannot be exported yet."""
    model_class = get_domain(domain).load_model_class()
    if model_class.export_spec is BaseTask.export_spec:
        pytest.skip(f"{domain}: {model_class.__qualname__} does not implement export_spec() yet, so it has no bundle to serve")


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


def random_sample(spec: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """One sample of an input spec (named axes get size 5)."""
    shape = [5 if not isinstance(s, int) else s for s in spec["shape"][1:]]
    if "float" in spec["dtype"]:
        return rng.random(shape).astype(spec["dtype"])
    return rng.integers(0, 2, shape).astype(spec["dtype"])


def bundle_outputs(bundle: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the bundle computes for one sample, in this process."""
    from pipelines.bundle_runtime import Bundle

    return Bundle(bundle).run(**{name: value[None] for name, value in inputs.items()})


def assert_matches_bundle(answer: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    assert set(answer["outputs"]) == set(expected)
    for name, want in expected.items():
        got = np.array(answer["outputs"][name], dtype=np.float64)
        np.testing.assert_allclose(got, want[0], atol=ATOL, rtol=1e-5, err_msg=f"output {name!r}")


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
        ({"image_base64": "not base64!"}, 400, "image_base64: not valid base64"),
        ({"image_base64": base64.b64encode(b"GIF89a not really").decode()}, 400, "image_base64: not a readable PNG or JPEG"),
        ({"image_base64": 7}, 422, "image_base64: expected a non-empty base64 string"),
        ({"image_base64": png_or_jpeg(pixels), "threshold": 0.3}, 422, "threshold: unexpected field"),
    ]
    for payload, want_status, want_text in cases:
        status, answer = request(server.url + "/predict", payload)
        assert status == want_status and want_text in answer["detail"], (want_text, status, answer)


# ----- autonomous: sequences of named observations ---------------------------------------------
CHECKPOINT_ATOL = 1e-4  # HTTP answers vs the checkpoint's prediction path in PyTorch: onnxruntime float32 rounding


def autonomous_test_batch(ckpt: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The checkpoint's model, the first test batch of its own (simulated) data as the prediction path prepares it, and the data settings."""
    from domains.autonomous.data import SensorSequenceDataModule
    from pipelines.export import load_task

    task, state, raw = load_task(get_domain("autonomous"), ckpt)
    settings = {k: v for k, v in raw["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    datamodule = SensorSequenceDataModule(**settings)
    datamodule.load_state_dict(state)
    datamodule.setup("test")
    return task, datamodule.on_after_batch_transfer(next(iter(datamodule.test_dataloader())), 0), settings


def observations(past: Any, channels: Any, channel_names: list[str], position_names: list[str] | None, times: Any = None) -> list[dict[str, Any]]:
    """One window as the observations form: an object per step, positions named (or as one ``position`` list)."""
    rows = []
    for t in range(len(past)):
        point = [float(v) for v in past[t]]
        row: dict[str, Any] = dict(zip(position_names, point)) if position_names else {"position": point}
        row |= {name: float(v) for name, v in zip(channel_names, channels[t])}
        rows.append(row if times is None else {"time": float(times[t]), **row})
    return rows


def forecast_array(answer: dict[str, Any], names: list[str]) -> np.ndarray:
    return np.array([[step[n] for n in names] for step in answer["forecast"]])


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


def without_position_names_and_time_step(bundle: Path) -> dict[str, Any]:
    """The bundle's metadata as a bundle exported before ``position_names`` and ``time_step`` were recorded."""
    metadata = json.loads((bundle / "metadata.json").read_text())
    metadata["domain_metadata"] = {k: v for k, v in metadata["domain_metadata"].items() if k not in ("position_names", "time_step")}
    return metadata


def served_answer(adapter: Any, bundle: Path, body: dict[str, Any]) -> dict[str, Any]:
    """An adapter's answer computed as the server does (decode, the bundle, encode), in this process."""
    from pipelines.bundle_runtime import Bundle

    return adapter.encode(adapter.infer(adapter.decode(body), Bundle(bundle).run))


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


@pytest.fixture(scope="module")
def torchscript_bundle(trained, tmp_path_factory) -> Path:
    """A healthcare TorchScript bundle."""
    require_export_spec("healthcare")
    return export_checkpoint(get_domain("healthcare"), trained("healthcare"), "torchscript", tmp_path_factory.mktemp("ts") / "bundle")


def test_torchscript_bundle_and_sigint(torchscript_bundle, tmp_path):
    domain, bundle = "healthcare", torchscript_bundle
    served = start_server(domain, bundle, tmp_path / "server.log", "--max_batch_size", "1")
    try:
        metadata = json.loads((bundle / "metadata.json").read_text())
        inputs = {spec["name"]: random_sample(spec, np.random.default_rng(7)) for spec in metadata["inputs"]}
        status, answer = request(served.url + "/predict", {"inputs": {n: v.tolist() for n, v in inputs.items()}})
        assert status == 200, answer
        assert_matches_bundle(answer, bundle_outputs(bundle, inputs))
        status, answer = request(served.url + "/predict", {"inputs": {"image": [[0.5]]}})
        assert status == 422 and "inputs.image: expected a float32 array of shape" in answer["detail"], answer
    finally:
        code = served.stop(signal.SIGINT, timeout=20)
    assert code == 0, served.output()


def test_cli_refuses_a_bundle_of_another_domain_or_format(torchscript_bundle, tmp_path):
    bundle = torchscript_bundle
    other = next((d for d in DOMAINS if d != "healthcare"), None)
    cases = [(["healthcare", "--bundle", str(tmp_path / "missing")], "not a bundle (no metadata.json)")]
    if other:
        cases.append(([other, "--bundle", str(bundle)], f"was exported by domain 'healthcare', not {other!r}"))
    future = Path(shutil.copytree(bundle, tmp_path / "future"))
    metadata = json.loads((future / "metadata.json").read_text())
    metadata["bundle_format"] = 99
    (future / "metadata.json").write_text(json.dumps(metadata))
    cases.append((["healthcare", "--bundle", str(future)], "bundle format 99 is not supported"))
    with contextlib.ExitStack() as stack:  # every server stopped with its group, whatever the outcome
        processes = [
            stack.enter_context(child_process(
                [sys.executable, "-m", "pipelines.serve", *argv, "--port", str(free_port())],
                cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))  # fmt: skip
            for argv, _ in cases
        ]
        for (argv, message), process in zip(cases, processes):
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 2 and message in stderr, (argv, process.returncode, stderr[-2000:])


# ----- autonomous: classification and regression bundles (their own models and servers) -------
@pytest.mark.parametrize("target", ["manoeuvre", "aggressiveness"], ids=["classification", "regression"])
def test_autonomous_classes_and_values_match_the_checkpoint(target, tmp_path_factory):
    """Positions named as for forecasters (or as one list); probabilities by class name, or the de-normalised value.
    A bundle exported before position names were recorded reads positions only as a list."""
    import torch
    from fastapi import HTTPException

    from domains.autonomous.serving import ObservationsAdapter

    task_name = "classification" if target == "manoeuvre" else "regression"
    runs_dir = tmp_path_factory.mktemp(f"autonomous-{task_name}")
    options = (f"--data.task={task_name}", f"--data.target_column={target}", "--data.stride=8")
    run_pipeline("autonomous", "fit", *get_domain("autonomous").test_args, *FAST, *options, "--runs_dir", str(runs_dir))
    ckpt = only_run(runs_dir, "autonomous") / "checkpoints" / "last.ckpt"
    task, batch, settings = autonomous_test_batch(ckpt)
    with torch.no_grad():  # as predict_step computes them (class probabilities calibrated on validation)
        out = task.network(batch["inputs"])
        expected = (task.calibration.probabilities(out) if task_name == "classification" else out[:, 0] * batch["target_std"] + batch["target_mean"]).numpy()
    bundle = export_checkpoint(get_domain("autonomous"), ckpt, "onnx", runs_dir / "bundle")
    served = start_server("autonomous", bundle, runs_dir / "server.log")
    try:
        metadata = json.loads((bundle / "metadata.json").read_text())["domain_metadata"]
        names, positions = metadata["class_names"], metadata["position_names"]
        assert positions == settings["target_channels"] and metadata["time_step"] == settings["sim_dt"]
        sequences = [observations(batch["past"][i], batch["channels"][i], settings["channels"], None if i == 2 else positions) for i in range(3)]
        status, answer = request(served.url + "/predict", {"sequences": sequences})
        assert status == 200, answer
        old = ObservationsAdapter(without_position_names_and_time_step(bundle))  # as exported before position names were recorded
        answers = [*enumerate(answer["predictions"]), (2, served_answer(old, bundle, {"observations": sequences[2]}))]
        for i, prediction in answers:
            if task_name == "regression":
                assert prediction["target"] == target and prediction["prediction"] == pytest.approx(float(expected[i]), abs=CHECKPOINT_ATOL)
                continue
            assert list(prediction["probabilities"]) == names and prediction["prediction"] == names[int(np.argmax(expected[i]))]
            np.testing.assert_allclose(list(prediction["probabilities"].values()), expected[i], atol=CHECKPOINT_ATOL)
        bad = [{**row, "position": row["position"][:1]} for row in sequences[2]]
        status, answer = request(served.url + "/predict", {"observations": bad})
        assert status == 422 and answer["detail"].startswith("observations[0].position: expected a list of 2 numbers"), answer
        with pytest.raises(HTTPException, match=r"observations\[0\]\.position: missing channel"):
            old.decode({"observations": sequences[0]})  # named positions: the old bundle does not know the names
    finally:
        assert served.stop() == 0, served.output()


# ----- media: diffusion bundles sampled by the server ------------------------------------------
def test_diffusion_seed_requests_run_the_ddim_loop(tmp_path):
    """``{"seed", "count", "steps"}`` on a one-step diffusion bundle gives DDIM-sampled images equal (to 1/255) to the checkpoint's own sampler."""
    import torch

    from domains.media.serving import seeded_noise_numpy

    model, checkpoint = tiny_diffusion(tmp_path)
    bundle = export_checkpoint(get_domain("media"), checkpoint, "onnx", tmp_path / "bundle")
    served = start_server("media", bundle, tmp_path / "server.log", "--batch_timeout", "0.05", "--log_level", "debug")
    try:

        def expected(seed: int, count: int, steps: int) -> np.ndarray:
            noise = torch.from_numpy(seeded_noise_numpy(list(range(seed, seed + count)), [3, 8, 8]))
            labels = torch.arange(seed, seed + count) % 2
            with torch.no_grad():
                images = (model.sample(noise, labels, steps=steps, sampler="ddim").clamp(-1, 1) + 1) / 2
            return np.rint(images.numpy() * 255).transpose(0, 2, 3, 1)

        bodies = [{"seed": 0, "count": 3, "steps": 7}, {"seed": 5, "count": 2, "steps": 7}, {"seed": 0, "count": 2}, {"seed": 9, "steps": 1}]
        answers: dict[int, tuple[int, Any]] = {}
        barrier = threading.Barrier(len(bodies))

        def client(i: int) -> None:
            barrier.wait(timeout=30)
            answers[i] = request(served.url + "/predict", bodies[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT + 30)
        for i, body in enumerate(bodies):
            status, answer = answers[i]
            steps = body.get("steps", 4)
            assert status == 200 and answer["steps"] == steps, (body, answer)
            got, want = decode_pngs(answer).astype(float), expected(body["seed"], body.get("count", 1), steps)
            assert got.shape == want.shape and np.abs(got - want).max() <= 1, (body, np.abs(got - want).max())
            assert np.abs(want - 127.5).max() > 20, "the images must not be flat"
        assert not np.array_equal(decode_pngs(answers[0][1])[:2], decode_pngs(answers[2][1]))  # same noise: 7 steps differ from 4
        sizes = [int(n) for n in re.findall(r"batch of (\d+) request", served.log.read_text(errors="replace"))]
        assert sizes and max(sizes) > 1, f"concurrent diffusion requests were never batched (batch sizes {sizes})"

        cases = [
            ({"seed": 0, "steps": 0}, "steps: must be in 1..100; got 0"),
            ({"seed": 0, "steps": 101}, "steps: must be in 1..100; got 101"),
            ({"seed": 0, "steps": "50"}, "steps: expected an integer"),
            ({"seed": 0, "count": 32, "steps": 51}, "steps: count x steps must be at most 1600"),
            ({"seed": 0, "count": 65}, "count: must be in 1..64"),
            ({"seed": 0, "label": "c"}, "label: unknown class 'c'"),
            ({"seed": 0, "eta": 1.0}, "eta: unexpected field"),
        ]
        for body, want in cases:
            status, answer = request(served.url + "/predict", body)
            assert status == 422 and answer["detail"].startswith(want), (body, status, answer)
        forms = request(served.url + "/info")[1]["model"]["request_forms"]
        assert "steps 1..100, default 4" in forms["seed"], forms
    finally:
        assert served.stop() == 0, served.output()


def test_ddim_schedule_for_any_steps_is_monais():
    """The server's DDIM timesteps for a request's ``steps`` are exactly those of MONAI's ``DDIMScheduler.set_timesteps``."""
    from monai.networks.schedulers import DDIMScheduler

    from domains.media.serving import ddim_schedule_for

    for total in (100, 1000):
        scheduler = DDIMScheduler(num_train_timesteps=total)
        for steps in range(1, total + 1):
            scheduler.set_timesteps(steps)
            schedule = ddim_schedule_for({"num_train_timesteps": total}, steps)
            assert schedule["timesteps"] == scheduler.timesteps.tolist() and schedule["step_stride"] == total // steps, (total, steps)
