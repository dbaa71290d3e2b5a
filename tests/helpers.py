"""What several test files share, so that no test file imports another.

- Callbacks a user could pass with ``--trainer.callbacks`` (child processes import them by class
  path: this module imports nothing heavy at the top).
- A real ``python -m pipelines.serve`` child process on a free loopback port (serving a bundle, or the
  finance champion of a model registry), HTTP requests to it and its ``/metrics``.
- Nights of finance data for the retraining, registry-serving and drift tests.
- Checkpoints written without training (an untrained diffusion model, any LightningModule) and the
  tiny media settings the media test files train with.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np


# ----- callbacks --------------------------------------------------------------------------------------
class PauseEachBatch(pl.Callback):
    """Sleep after every training batch so that a test can kill the run mid-training."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)


class PoisonWeights(pl.Callback):
    """Set every weight of the model to NaN, as a diverged optimiser or a corrupted device would:
    before training step ``step`` (``step >= 0``) or before testing (``step < 0``)."""

    def __init__(self, step: int = -1) -> None:
        self.step = step

    @staticmethod
    def _poison(pl_module: pl.LightningModule) -> None:
        import torch

        with torch.no_grad():
            for parameter in pl_module.parameters():
                parameter.fill_(float("nan"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.step >= 0 and trainer.global_step == self.step:
            self._poison(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        if self.step < 0:
            self._poison(pl_module)


class FailPredictBatch(pl.Callback):
    """Raise at predict batch ``batch``, as a crash mid-scoring would (earlier batches are written by then)."""

    def __init__(self, batch: int = 1) -> None:
        self.batch = batch

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            raise RuntimeError(f"FailPredictBatch: a crash at predict batch {batch_idx}")


class FailOnRank(pl.Callback):
    """Raise on DDP rank ``rank`` when the test ends: after the run's last collective, so no other rank notices on its own."""

    def __init__(self, rank: int = 1) -> None:
        self.rank = rank

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"FailOnRank: rank {self.rank} fails at the end of the test")

class CountEvaluatedRows(pl.Callback):
    """Count the rows each process scores in its last validation epoch (not the sanity check) and in its test,
    and write ``folder/rank{R}.json``: ``{"val": [rows, dataset length], "test": [rows, dataset length]}``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.rows: dict[str, list[int]] = {}

    @staticmethod
    def _rows(batch: Any) -> int:
        import torch

        return len(next(value for value in batch.values() if isinstance(value, torch.Tensor)))

    def _count(self, trainer: pl.Trainer, stage: str, batch: Any, dataloader_idx: int) -> None:
        if trainer.sanity_checking:
            return
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        counted = self.rows.setdefault(stage, [0, len(loader.dataset)])
        counted[0] += self._rows(batch)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.rows.pop("val", None)  # the last epoch's

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count(trainer, "val", batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count(trainer, "test", batch, dataloader_idx)

    def on_test_end(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


# ----- a real server process --------------------------------------------------------------------------
START_TIMEOUT = 120.0
REQUEST_TIMEOUT = 60.0
REGISTRY_START_TIMEOUT = 240.0  # serving a registry: the first export runs before the server listens


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, body: Any = None, raw: bytes | None = None, content_type: str = "application/json") -> tuple[int, Any]:
    """One HTTP request (POST when there is a body); returns (status, decoded JSON or text)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@dataclass
class Server:
    """A running ``pipelines.serve`` child process, the leader of its own process group (``tests/processes.py``):
    its HTTP processes, inference worker and export child are in that group. Stop it with :meth:`stop` (the test's
    own check) and always, in a ``finally`` block or fixture finaliser, with :meth:`kill`."""

    domain: str
    url: str
    port: int
    bundle: Path
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``signum`` to the server, wait for it to exit and return its exit status. Every process it started
        must have ended with it (within 10 s more): any left is killed and reported. With SIGKILL (no clean-up
        possible) what is left is killed without a word."""
        from tests.processes import group_members, stop_group  # not at the top: child processes import this module

        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_group(self.process)
            raise AssertionError(f"server did not stop within {timeout}s of signal {signum}:\n{self.output()}") from None
        deadline = time.monotonic() + 10
        while group_members(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = stop_group(self.process)
        if left and signum != signal.SIGKILL:
            raise AssertionError(f"server exited {code} on signal {signum} but left processes {left} running (now killed):\n{self.output()}")
        return code

    def kill(self) -> list[int]:
        """SIGKILL the server and every process of its group, whatever state it is in (also after :meth:`stop`, or
        when the server itself died and left its workers); returns the pids that were still running."""
        from tests.processes import stop_group

        return stop_group(self.process)


def start_server(domain: str, bundle: Path, log: Path, *extra: str, source: list[str] | None = None, start_timeout: float = START_TIMEOUT) -> Server:
    """``python -m pipelines.serve DOMAIN --bundle BUNDLE EXTRA`` (or ``source`` instead of ``--bundle BUNDLE``, e.g.
    ``["--registry", DIR]``) on a free loopback port, once ``/health`` answers; in its own process group, killed
    whole if it does not get healthy."""
    from tests.conftest import ROOT, child_env  # not at the top: child processes import this module for its callbacks
    from tests.processes import start_child

    port = free_port()
    with open(log, "wb") as handle:
        process = start_child(
            [sys.executable, "-m", "pipelines.serve", domain, *(source or ["--bundle", str(bundle)]), "--port", str(port), *extra],
            cwd=ROOT, env=child_env(), stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Server(domain, f"http://127.0.0.1:{port}", port, bundle, process, log)
    try:
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode} before answering /health:\n{server.output()}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return server
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise AssertionError(f"server not healthy within {start_timeout}s:\n{server.output()}")
    except BaseException:  # not healthy, or the test was interrupted (pytest-timeout, Ctrl+C) while it started
        server.kill()
        raise


def start_champion_server(root: Path, log: Path, *extra: str) -> Server:
    """A server following the finance champion of the model registry ``root/registry`` (the first export runs before it listens)."""
    return start_server("finance", root, log, *extra, source=["--registry", str(root / "registry")], start_timeout=REGISTRY_START_TIMEOUT)


def predict_with_headers(url: str, body: dict) -> tuple[int, dict[str, str], dict]:
    """``POST /predict``; returns (status, response headers, decoded JSON)."""
    req = urllib.request.Request(url + "/predict", data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"{}")


def metric_samples(url: str) -> dict[str, float]:
    """``GET /metrics`` as {"name{labels}": value} (the text exposition format)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def decode_pngs(answer: dict) -> np.ndarray:
    """The images of a seed-generation answer (base64 PNGs) as one (N, H, W, 3) uint8 array."""
    from PIL import Image

    assert answer["format"] == "png"
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")) for text in answer["images"]])


# ----- nights of finance data (retraining, serving a registry, drift) ------------------------------------
#: a finance retraining attempt in seconds: 3 batches of one epoch, no logger
FAST = ["--data.batch_size=64", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.logger=false"]


def write_night(path: Path, night: int, rows: int = 1500) -> None:
    """An ADBench-style file (``X``, ``y``): normal rows around a centre that drifts a little each night,
    10 % anomalies shifted on a third of the features. Written atomically, as a data export job would."""
    rng = np.random.default_rng(night)
    normal = rng.normal(0.05 * night, 1.0, size=(rows, 12))
    anomalies = rng.normal(0.05 * night, 1.0, size=(rows // 10, 12))
    anomalies[:, :4] += 1.5
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, X=np.concatenate([normal, anomalies]).astype("float32"), y=np.r_[np.zeros(rows), np.ones(rows // 10)])
    os.replace(tmp, path)


# ----- checkpoints without training, tiny media settings ---------------------------------------------
#: media models small enough to train a few steps in a second on a CPU (16x16 images)
TINY_GAN = {"latent_dim": 16, "width": 8, "generator_width": 8, "fid_samples": 16, "grid_samples": 6, "extractor_steps": 2, "extractor_width": 8}
TINY_DIFFUSION = {
    "unet_widths": [16, 16], "attention_levels": [False, True], "norm_num_groups": 8, "num_head_channels": 16,
    "num_train_timesteps": 40, "sampling_steps": 4, "eval_steps": 2, "fid_samples": 16, "grid_samples": 6,
    "extractor_steps": 2, "extractor_width": 8,
}  # fmt: skip
#: a Trainer that writes no logs and prints nothing
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
#: an untrained class-conditional diffusion model on 8x8 RGB images (exported and served, never trained)
SERVED_DIFFUSION = {
    "unet_widths": [16, 16], "attention_levels": [False, False], "norm_num_groups": 8, "num_head_channels": 16, "num_train_timesteps": 100,
    "sampling_steps": 4, "in_channels": 3, "image_size": 8, "num_classes": 2, "class_names": ["a", "b"],
}  # fmt: skip


def linked(dm) -> dict:
    """What the runner links from a media data module to the model."""
    return {"in_channels": dm.in_channels, "image_size": dm.image_size, "num_classes": dm.num_classes, "class_names": dm.class_names}


def shapes_module(**kwargs):
    """The media data module on 80 synthetic 16x16 shapes (three classes), batches of 16."""
    from domains.media.data import MediaDataModule

    return MediaDataModule(**{"synthetic_samples": 80, "image_size": 16, "batch_size": 16, "num_generate": 6, **kwargs})


def save_checkpoint(model: pl.LightningModule, path: Path) -> Path:
    """A checkpoint as the runner writes it for ``load_task``: weights, hyper-parameters and the model class."""
    import torch

    hparams = {**dict(model.hparams), "_class_path": f"{type(model).__module__}.{type(model).__qualname__}"}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, path)
    return path


def tiny_diffusion(folder: Path):
    """An untrained class-conditional diffusion model (8x8 RGB, non-trivial weights) and its checkpoint: no training needed."""
    import torch

    from domains.media.model import Diffusion

    torch.manual_seed(0)
    model = Diffusion(**SERVED_DIFFUSION).eval()
    with torch.no_grad():  # untrained, MONAI's output convolution is zero: give the EMA UNet non-trivial weights
        for p in model.ema_unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, save_checkpoint(model, folder / "diffusion.ckpt")
