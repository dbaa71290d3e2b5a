"""``python -m pipelines.serve DOMAIN --registry DIR --alias champion``: the champion served, followed through a promotion.

A real finance registry is made by two real ``pipelines.retrain`` runs (two nights of data: two
versions; the first is the session's ``finance_champion``, shared with tests/test_drift.py), a real server follows its champion, and while clients send requests without pause a real
``pipelines.registry promote`` moves the champion: no request fails, the answers switch from one
version to the other (headers, ``/info``, metrics, and the scores themselves), and a champion whose
files are damaged is refused while the old model keeps serving.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.bundle_runtime import Bundle
from pipelines.files import sha256_file
from pipelines.model_registry import ModelRegistry
from pipelines.registry_cli import main as registry_main
from pipelines.retrain import main as retrain_main
from tests.conftest import ROOT, child_env
from tests.helpers import FAST, free_port, metric_samples, predict_with_headers, request, start_champion_server, write_night
from tests.processes import run_child, start_child, stop_group


def our_tracebacks(output: str) -> list[int]:
    """Lines where a traceback starts, except litserve's own "Monitoring worker crashed" at shutdown (a race
    in litserve's monitor thread when its manager process stops after the drain; seen once in a loaded full
    suite, the server still drained and exited 0). Any other traceback fails the test."""
    lines = output.splitlines()
    return [i for i, line in enumerate(lines) if line.startswith("Traceback") and not any("Monitoring worker crashed" in l for l in lines[max(0, i - 2) : i])]

def retrain(root: Path, *args: str) -> int:
    return retrain_main(["finance", "--registry", str(root / "registry"), "--runs_dir", str(root / "runs"), *FAST, "--data.path", str(root / "latest.npz"), *args])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, finance_champion: Path) -> Path:
    """A finance registry with two versions (real retrains on two nights), v0001 the champion: a copy of the
    session's first champion (night 1, tests/conftest.py), then a retrain on night 5."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(finance_champion / "registry", root / "registry")
    write_night(root / "latest.npz", 5)
    assert retrain(root, "--force") in (0, 3)
    reg = ModelRegistry(root / "registry", "finance")
    assert reg.versions() == ["v0001", "v0002"]
    if reg.champion() == "v0002":
        assert registry_main(["finance", "rollback", "--registry", str(root / "registry")]) == 0
    assert reg.champion() == "v0001"
    return root


def weights_sha(root: Path, version: str) -> str:
    return sha256_file(ModelRegistry(root / "registry", "finance").version_dir(version) / "model.safetensors")


def test_unknown_alias_is_refused_before_serving(registry, tmp_path):
    done = run_child(
        [sys.executable, "-m", "pipelines.serve", "finance", "--registry", str(registry / "registry"), "--alias", "nightly", "--port", str(free_port())],
        120, cwd=ROOT, env=child_env(),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--alias nightly" in done.stderr and "no version 'nightly'" in done.stderr and "v0001, v0002" in done.stderr, done.stderr


def test_promotion_under_load_switches_version_without_a_failed_request(registry, tmp_path):
    cache = registry / "bundle-cache"  # shared with the SIGHUP test, which reuses its bundles
    served = start_champion_server(registry, tmp_path / "server.log", "--reload_interval", "0.5", "--bundle_cache", str(cache), "--max_batch_size", "4")
    try:
        status, info = request(served.url + "/info")
        model = info["model"]
        assert status == 200 and (model["name"], model["version"], model["checkpoint_sha256"]) == ("finance", "v0001", weights_sha(registry, "v0001"))
        assert model["registry"]["alias"] == "champion" and model["registry"]["version"] == "v0001"
        spec = model["inputs"][0]
        rows = np.random.default_rng(0).normal(size=(8, spec["shape"][1])).round(3).tolist()
        body = {"inputs": {spec["name"]: rows[0]}}

        answers: list[list[tuple[float, int, str, dict]]] = [[], []]
        stop = threading.Event()

        def client(k: int) -> None:
            while not stop.is_set():
                status, headers, answer = predict_with_headers(served.url, body)
                answers[k].append((time.monotonic(), status, headers.get("x-model-version", ""), answer))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
        for thread in threads:
            thread.start()
        while min(len(a) for a in answers) < 5:
            time.sleep(0.05)
        assert registry_main(["finance", "promote", "v0002", "--registry", str(registry / "registry")]) == 0
        promoted = time.monotonic()
        deadline = promoted + 180
        while not all(a and a[-1][2] == "v0002" for a in answers) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(60)

        flat = [row for a in answers for row in a]
        assert [s for _, s, _, _ in flat] == [200] * len(flat), [(s, a) for _, s, _, a in flat if s != 200][:3]
        for sequence in answers:  # each client's answers: v0001, then v0002 only (a worker never goes back)
            versions = [v for _, _, v, _ in sequence]
            switch = versions.index("v0002")
            assert set(versions[:switch]) == {"v0001"} and set(versions[switch:]) == {"v0002"}, versions
        first_new = min(t for t, _, v, _ in flat if v == "v0002")
        print(f"{len(flat)} requests, none failed; v0002 answered {first_new - promoted:.1f} s after the promotion")
        outputs = {v: a["outputs"] for _, _, v, a in flat}
        assert outputs["v0001"] != outputs["v0002"], "the new version's model answers, not only its name"
        expected = Bundle(cache / "v0002-onnx").run(**{spec["name"]: np.asarray([rows[0]], dtype=spec["dtype"])})
        name = next(iter(outputs["v0002"]))
        np.testing.assert_allclose(np.asarray(outputs["v0002"][name]), expected[name], rtol=1e-5, atol=1e-6)

        status, info = request(served.url + "/info")
        assert (info["model"]["version"], info["model"]["checkpoint_sha256"]) == ("v0002", weights_sha(registry, "v0002"))
        samples = metric_samples(served.url)
        labels = 'checkpoint_sha256="{}",domain="finance",format="onnx",name="finance",version="{}"'
        assert samples[f"pipelines_serve_model_info{{{labels.format(weights_sha(registry, 'v0002'), 'v0002')}}}"] == 1
        assert samples[f"pipelines_serve_model_info{{{labels.format(weights_sha(registry, 'v0001'), 'v0001')}}}"] == 0
        assert samples['pipelines_serve_model_reloads_total{result="loaded"}'] == 1
        assert samples["pipelines_serve_in_flight_requests"] == 0

        # a champion whose weights were damaged after promotion: refused (checksums), the old model keeps serving
        reg = ModelRegistry(registry / "registry", "finance")
        weights = reg.version_dir("v0001") / "model.safetensors"
        original = weights.read_bytes()
        try:
            weights.write_bytes(original[:-8] + b"\0" * 8)
            assert registry_main(["finance", "rollback", "--registry", str(registry / "registry")]) == 1, "rollback verifies the version"
            record = json.loads((reg.path / "champion.json").read_text())
            (reg.path / "champion.json").write_text(json.dumps({**record, "version": "v0001"}))  # what a hand edit or a bad copy does
            served.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while metric_samples(served.url).get('pipelines_serve_model_reloads_total{result="export_failed"}', 0) < 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert metric_samples(served.url)['pipelines_serve_model_reloads_total{result="export_failed"}'] >= 1, served.output()
            status, headers, _ = predict_with_headers(served.url, body)
            assert (status, headers["x-model-version"]) == (200, "v0002")
            assert "does not match its sha256" in served.output() and "still serving v0002" in served.output()
        finally:
            weights.write_bytes(original)
            (reg.path / "champion.json").write_text(json.dumps(record))
        assert served.stop() == 0, served.output()
        assert not our_tracebacks(served.output()), served.output()
    finally:
        served.kill()  # it and every process it started, whatever happened (a no-op after a clean stop)


def test_sighup_reloads_at_once_and_cached_bundles_are_reused(registry, tmp_path):
    """With a reload interval of an hour, an alias moved by ``registry alias set`` is served after SIGHUP (not before);
    bundles already in ``--bundle_cache`` for the same weights are reused instead of exported again."""
    cache = registry / "bundle-cache"
    cli = ["--registry", str(registry / "registry")]
    assert registry_main(["finance", "alias", "set", "staging", "v0001", *cli]) == 0
    served = start_champion_server(registry, tmp_path / "server.log", "--alias", "staging", "--reload_interval", "3600", "--bundle_cache", str(cache))
    try:
        body = {"inputs": {"numeric": [0.0] * request(served.url + "/info")[1]["model"]["inputs"][0]["shape"][1]}}
        assert predict_with_headers(served.url, body)[1]["x-model-version"] == "v0001"
        assert registry_main(["finance", "alias", "set", "staging", "v0002", *cli]) == 0
        time.sleep(3)
        assert predict_with_headers(served.url, body)[1]["x-model-version"] == "v0001", "no look at the registry before the interval or a SIGHUP"
        served.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 180
        while predict_with_headers(served.url, body)[1]["x-model-version"] != "v0002" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert predict_with_headers(served.url, body)[1]["x-model-version"] == "v0002", served.output()
        assert request(served.url + "/info")[1]["model"]["registry"]["alias"] == "staging"
        assert served.stop() == 0, served.output()
    finally:
        served.kill()  # it and every process it started, whatever happened (a no-op after a clean stop)
    assert not our_tracebacks(served.output()), served.output()
    served = start_champion_server(registry, tmp_path / "again.log", "--alias", "staging", "--bundle_cache", str(cache))
    try:
        assert predict_with_headers(served.url, body)[1]["x-model-version"] == "v0002"
        assert "exported finance" not in served.output(), "the cached v0002 bundle (same weights sha256) is reused"
        assert served.stop() == 0
    finally:
        served.kill()  # it and every process it started, whatever happened (a no-op after a clean stop)


def test_sigterm_during_the_first_export_leaves_complete_bundles_only_and_no_temporary_folders(registry, tmp_path):
    """A real SIGTERM while the server's export child writes its staging folder into the cache: exit 143, no staging
    folder, no published pointer, no metrics or checkpoint temporary folder, no export child left running."""
    import tempfile

    cache, version = tmp_path / "cache", ModelRegistry(registry / "registry", "finance").champion()  # v0002 after the promotion test
    tmp = Path(tempfile.mkdtemp(prefix="t"))  # the server's TMPDIR: short, for the AF_UNIX sockets of its process manager
    with open(tmp_path / "server.log", "wb") as log:
        process = start_child(
            [sys.executable, "-m", "pipelines.serve", "finance", "--registry", str(registry / "registry"), "--bundle_cache", str(cache), "--port", str(free_port())],
            cwd=ROOT, env=child_env(TMPDIR=str(tmp)), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not list(cache.glob(f".{version}-onnx.*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(cache.glob(f".{version}-onnx.*")), "the export's staging folder never appeared: " + (tmp_path / "server.log").read_text()[-2000:]
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=90)
    finally:
        stop_group(process)  # the server and its export child, whatever happened
    output = (tmp_path / "server.log").read_text()
    assert code == 143 and "stopped by SIGTERM" in output, output[-3000:]
    left = sorted(p.name for p in cache.iterdir())
    assert left in ([], [f"{version}-onnx"]) and (not left or (cache / f"{version}-onnx" / "metadata.json").is_file()), left
    leftovers = sorted(p.name for p in tmp.iterdir())
    shutil.rmtree(tmp)
    assert leftovers == [], "the metrics folder and the export's checkpoint copy are removed"
    assert not [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines() if str(cache) in line], "no export child left running"
