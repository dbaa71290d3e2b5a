"""Drift for autonomous (per sequence channel) and media (the generated images' summary, with an MMD test), and the
Parquet request log: reference statistics in the tiny runs' checkpoints and bundles, ``pipelines.monitor`` on request
logs written as the server writes them (the real ``RequestLog`` and ``item_features``/``item_outputs``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import torch

from pipelines.domain_registry import get_domain
from pipelines.export import export_checkpoint
from pipelines.reference import find_in_checkpoint, load_reference
from pipelines.request_log import RequestLog, item_features, item_outputs, read_log, segment_files
from tests.conftest import ROOT, child_env
from tests.processes import run_child


def monitor(*args: str) -> subprocess.CompletedProcess:
    return run_child([sys.executable, "-m", "pipelines.monitor", *args], 300, cwd=ROOT, env=child_env())


def write_log(path, model: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], reference, version: str = "v1") -> None:
    """A request log as a server of model ``version`` writes it (a bundle's log carries the bundle's served version)."""
    count = len(next(iter({**inputs, **outputs}.values())))
    RequestLog(path).append([{"time": "2026-11-30T10:00:00.000+00:00", "model": model, "version": version, "form": "test",
                              "features": item_features(inputs, i, reference), "outputs": item_outputs(outputs, i)} for i in range(count)])  # fmt: skip


def served_version(bundle) -> str:
    from pipelines.serving_server import model_identity

    return model_identity(json.loads((bundle / "metadata.json").read_text()))["version"]


def datamodule_of(checkpoint: dict, cls):
    return cls(**{k: v for k, v in checkpoint["datamodule_hyper_parameters"].items() if not k.startswith("_")})


def test_autonomous_reference_per_sequence_channel_flags_faster_traffic(tiny_run, tmp_path):
    from domains.autonomous.data import SensorSequenceDataModule

    ckpt = tiny_run("autonomous") / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    stats = find_in_checkpoint(checkpoint)
    assert stats is not None and set(stats["sequence_inputs"]) >= {"past"} and "training split" in stats["source"]
    bundle = export_checkpoint(get_domain("autonomous"), ckpt, "onnx", tmp_path / "bundle")
    assert load_reference(bundle) == stats
    data = datamodule_of(checkpoint, SensorSequenceDataModule)
    data.setup("fit")
    train = data.datasets["train"].tensors
    first = f"past.{stats['sequence_inputs']['past'][0]}"
    assert stats["features"][first]["count"] == len(train["past"])
    np.testing.assert_allclose(stats["features"][first]["mean"], train["past"][:, :, 0].double().mean().item(), rtol=1e-5, atol=1e-6)

    calm = {name: train[name].numpy() for name in ("past", "channels")}  # the training windows, through the request log's path
    fast = {**calm, "past": calm["past"] * 1.5}  # the same traffic 50 % faster
    for name, inputs in (("calm", calm), ("fast", fast)):
        write_log(tmp_path / f"{name}.jsonl", "autonomous", inputs, {}, stats, served_version(bundle))
    calm_run = monitor(str(bundle), str(tmp_path / "calm.jsonl"), "--json", str(tmp_path / "calm.json"))
    fast_run = monitor(str(ckpt), str(tmp_path / "fast.jsonl"), "--json", str(tmp_path / "fast.json"))
    assert calm_run.returncode == 0, calm_run.stdout + calm_run.stderr
    calm_report = json.loads((tmp_path / "calm.json").read_text())
    assert all(f["psi"] < 0.01 for f in calm_report["features"]), "the logged per-channel means are the reference's own definition"
    assert fast_run.returncode == 3, fast_run.stdout + fast_run.stderr
    drifted = json.loads((tmp_path / "fast.json").read_text())["drifted"]
    assert {f"past.{name}" for name in stats["sequence_inputs"]["past"]} & set(drifted), drifted


def test_media_reference_of_generated_images_flags_a_generator_that_draws_noise(tiny_run, tmp_path):
    from domains.media.data import MediaDataModule

    ckpt = tiny_run("media") / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    stats = find_in_checkpoint(checkpoint)
    assert stats["output"] == "images" and "output.images.pool[5]" in stats["features"] and len(stats["sample"]["rows"]) > 50
    hparams = {k: v for k, v in checkpoint["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    fresh = MediaDataModule(**{**hparams, "synthetic_samples": 400, "synthetic_seed": 1})  # new images of the same kind
    images = fresh.split_tensors("train")[0].numpy() * 0.5 + 0.5  # [0, 1], as the server answers them
    rng = np.random.default_rng(0)
    cases = {"real": images, "dark": images * 0.6, "noise": rng.uniform(size=images.shape).astype(np.float32)}
    for name, generated in cases.items():
        write_log(tmp_path / f"{name}.jsonl", "media", {}, {"images": generated.astype(np.float32)}, stats)
    frame, _ = read_log(tmp_path / "real.jsonl")
    assert "output.images.pool[15]" in frame and "output.images.std" in frame and not any("pixels" in c for c in frame), list(frame)
    # the tiny run's reference holds 96 training images: PSI's sampling noise (about bins / n = 0.1 per side) is near its
    # 0.2 threshold, so PSI is set aside here; KS (Bonferroni) and the MMD test account for the sizes
    results = {name: monitor(str(ckpt), str(tmp_path / f"{name}.jsonl"), "--psi_threshold", "5", "--json", str(tmp_path / f"{name}.json")) for name in cases}
    assert results["real"].returncode == 0, results["real"].stdout + results["real"].stderr
    for name in ("dark", "noise"):
        assert results[name].returncode == 3, results[name].stdout
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert "embedding (MMD)" in report["drifted"] and report["mmd"]["pvalue"] < 0.01, report["mmd"]
    assert json.loads((tmp_path / "real.json").read_text())["mmd"]["pvalue"] > 0.01


def test_parquet_request_log_segments_are_complete_or_absent_under_sigkill(tmp_path, child_processes):
    """A child appends batches to a Parquet request log and is SIGKILLed mid-stream: every segment reads whole, no temporary
    file is taken for one, and what was flushed is there in order; the monitor reads the segments as one window."""
    script = (
        "import sys, time\n"
        "from pipelines.request_log import RequestLog\n"
        "log = RequestLog(sys.argv[1])\n"
        "for i in range(10**6):\n"
        "    log.append([{'time': 't', 'model': 'm', 'version': 'v', 'form': 'f', 'features': {'a': float(i), 'b': float(j)}, 'outputs': {'score': 1.0}} for j in range(50)])\n"
    )
    path = tmp_path / "requests.parquet"
    child = child_processes.start([sys.executable, "-c", script, str(path)], cwd=ROOT, env=child_env())
    deadline = time.time() + 60
    while len(segment_files(path)) < 3 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    segments = segment_files(path)
    assert len(segments) >= 3 and not path.exists()
    frame, skipped = read_log(path)
    assert skipped == 0 and len(frame) == sum(len(pd.read_parquet(s)) for s in segments) and len(frame) % 50 == 0
    assert (np.diff(frame["a"].to_numpy()) >= 0).all() and set(frame["output.score"]) == {1.0}
    reference = tmp_path / "reference.csv"
    pd.DataFrame({"a": frame["a"].to_numpy(), "b": np.arange(len(frame)) % 50}).to_csv(reference, index=False)
    result = monitor(str(reference), str(path), "--columns", "a,b")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_request_log_name_that_is_neither_jsonl_nor_parquet_is_refused(tmp_path):
    result = run_child([sys.executable, "-m", "pipelines.serve", "finance", "--bundle", str(tmp_path), "--request_log", str(tmp_path / "requests.log")], 120, cwd=ROOT, env=child_env())  # fmt: skip
    assert result.returncode == 2 and "expected a .jsonl (JSON lines) or .parquet" in " ".join(result.stderr.split()), result.stderr[-2000:]
