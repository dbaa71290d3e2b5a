"""What the serving tests share: a domain's bundle skipped with the reason when it has none, random inputs and the
bundle's own answers to compare with, and for autonomous the checkpoint's test batch, windows in the observations
form and answers computed as the server does (tests/test_serve.py, tests/test_serve_bundles.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.domain_registry import get_domain
from pipelines.task import BaseTask

ATOL = 1e-5  # the server runs the same bundle; only batch composition may change the last bits
# the classification and regression forecasters' own tiny runs: the domain's test options, one batch of each stage, no test stage
FAST = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1")


def require_export_spec(domain: str) -> None:
    """Skip (with the reason) a domain whose model cannot be exported yet."""
    model_class = get_domain(domain).load_model_class()
    if model_class.export_spec is BaseTask.export_spec:
        pytest.skip(f"{domain}: {model_class.__qualname__} does not implement export_spec() yet, so it has no bundle to serve")


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




def without_position_names_and_time_step(bundle: Path) -> dict[str, Any]:
    """The bundle's metadata as a bundle exported before ``position_names`` and ``time_step`` were recorded."""
    metadata = json.loads((bundle / "metadata.json").read_text())
    metadata["domain_metadata"] = {k: v for k, v in metadata["domain_metadata"].items() if k not in ("position_names", "time_step")}
    return metadata


def served_answer(adapter: Any, bundle: Path, body: dict[str, Any]) -> dict[str, Any]:
    """An adapter's answer computed as the server does (decode, the bundle, encode), in this process."""
    from pipelines.bundle_runtime import Bundle

    return adapter.encode(adapter.infer(adapter.decode(body), Bundle(bundle).run))


