"""Feature extractors for FID and KID.

The standard extractor is torchmetrics' Inception-v3, whose weights are downloaded on first use
(and need ``torch-fidelity``): ``inception_metrics=true`` keeps that path for online users. Offline,
the project trains its own extractor, :class:`~domains.media.networks.FeatureCNN`: a small
classifier of the data's classes (or, for unlabelled data, of four rotations, a self-supervised
task) trained on the training split before the generator, frozen, stored in every checkpoint and
saved with the run as ``feature_extractor.safetensors``. Its name is part of every metric key
(``val/fid_cnn`` vs ``val/fid_inception``) so numbers from different extractors are never compared;
FIDs of two runs are comparable only when they share the extractor file
(``--model.init_args.feature_extractor_weights``); its SHA-256 is written beside it.

Example:
    >>> net = train_feature_cnn(torch.rand(24, 1, 16, 16) * 2 - 1, torch.arange(24) % 2, steps=2, width=8)
    >>> net.num_features
    32
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from domains.media.networks import FeatureCNN

OFFLINE_EXTRACTOR = "cnn"
INCEPTION = "inception"


def rotation_task(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-supervised labels for unlabelled images: each image rotated by 0/90/180/270 degrees."""
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(len(images))
    return rotated, labels


def train_feature_cnn(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int = 200,
    width: int = 16,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> FeatureCNN:
    """Train a :class:`FeatureCNN` on images in [-1, 1] for ``steps`` batches: the classes when labelled (>= 2), else rotations.

    Trains on the device ``images`` are on, with its own random generators, so the run's global
    random state (CPU and GPU) is left untouched. Gradients are on whatever the caller's context
    (a validation loop's ``no_grad`` or ``inference_mode``, e.g. when Lightning's learning-rate finder
    validates before the model's ``on_fit_start``).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _train_feature_cnn(images.clone(), labels.clone() if labels is not None else None, steps, width, batch_size, lr, seed)


def _train_feature_cnn(images: torch.Tensor, labels: torch.Tensor | None, steps: int, width: int, batch_size: int, lr: float, seed: int) -> FeatureCNN:
    labelled = labels is not None and bool((labels >= 0).all()) and int(labels.max()) >= 1
    if labelled:
        inputs, targets = images, labels.long()
        outputs = int(labels.max()) + 1
    else:
        inputs, targets = rotation_task(images)
        outputs = 4
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: the weights are initialised on the CPU
        net = FeatureCNN(images.shape[1], outputs, width).to(inputs.device)
    sampler = torch.Generator(device=inputs.device).manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1))
    net.train()
    for _ in range(steps):
        batch = torch.randint(0, len(inputs), (min(batch_size, len(inputs)),), device=inputs.device, generator=sampler)
        loss = loss_fn(net.logits(inputs[batch]), targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    net.eval()
    net.task = "classes" if labelled else "rotation"  # type: ignore[attr-defined]
    return net


@torch.no_grad()
def accuracy(net: FeatureCNN, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 256) -> float:
    """Accuracy of the extractor's own task on held-out images (``labels=None``: the rotation task)."""
    if labels is None:
        images, labels = rotation_task(images)
    correct = 0
    for start in range(0, len(images), batch_size):
        correct += int((net.logits(images[start : start + batch_size]).argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(len(images), 1)


def save_extractor(net: FeatureCNN, folder: Path, details: dict) -> Path:
    """Write ``feature_extractor.safetensors`` and ``feature_extractor.json`` (SHA-256, task, accuracy)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "feature_extractor.safetensors"
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={
        "channels": str(net.body[0].in_channels), "num_outputs": str(net.classifier.out_features), "width": str(net.body[0].out_channels),
        "pooling": net.pooling,
    })  # fmt: skip
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "feature_extractor.json").write_text(json.dumps({"name": OFFLINE_EXTRACTOR, "sha256": digest, "pooling": net.pooling, **details}, indent=2) + "\n")
    return path


def load_extractor(path: str | Path, channels: int) -> FeatureCNN:
    """Load a saved extractor (safetensors: no code runs on load) and check its input channels."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"feature_extractor_weights {path}: file not found")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        net = FeatureCNN(int(meta["channels"]), int(meta["num_outputs"]), int(meta["width"]), meta.get("pooling", "avg"))  # files from before "pooling": avg
        net.load_state_dict(load_file(str(path)))
    except Exception as error:
        raise ValueError(f"feature_extractor_weights {path}: not a feature extractor saved by the media domain ({error})") from None
    if int(meta["channels"]) != channels:
        raise ValueError(f"feature_extractor_weights {path}: made for {meta['channels']}-channel images, the data has {channels}")
    net.eval()
    return net


def inception_metrics(kid_subset_size: int) -> tuple[nn.Module, nn.Module]:
    """torchmetrics' Inception FID/KID (needs ``torch-fidelity`` and, on first use, internet for the weights)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    try:
        return (
            FrechetInceptionDistance(feature=2048, normalize=True),
            KernelInceptionDistance(feature=2048, normalize=True, subset_size=kid_subset_size),
        )
    except (ModuleNotFoundError, OSError, RuntimeError) as error:
        raise ValueError(
            f"inception_metrics=true needs torch-fidelity (`pip install torchmetrics[image]`) and the Inception "
            f"weights (downloaded on first use; no internet here?). Cause: {error} The offline metrics (val/fid_cnn) need neither."
        ) from None
