"""``python -m pipelines.serve`` with bundles of their own: a TorchScript bundle (and SIGINT), bundles of another
domain or format refused, autonomous classification and regression bundles (class probabilities and values equal
to the checkpoint's within ``CHECKPOINT_ATOL``), and a tiny diffusion model's server-side DDIM sampling (images
equal to the checkpoint's sampler to 1/255). The ONNX servers of every domain are tests/test_serve.py's."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.domain_registry import available_domains, get_domain
from pipelines.export import export_checkpoint
from tests.conftest import ROOT, child_env, only_run, run_pipeline
from tests.helpers import REQUEST_TIMEOUT, decode_pngs, free_port, request, start_server, tiny_diffusion
from tests.processes import child_process
from tests.serving_checks import (
    CHECKPOINT_ATOL, FAST, assert_matches_bundle, autonomous_test_batch, bundle_outputs, observations, random_sample, require_export_spec,
    served_answer, without_position_names_and_time_step,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_run):
    """``trained(domain)``: the last checkpoint of the domain's tiny run (tests/conftest.py: trained once per session)."""
    return lambda domain: tiny_run(domain) / "checkpoints" / "last.ckpt"


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
    other = next((d for d in available_domains() if d != "healthcare"), None)
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
