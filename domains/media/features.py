"""Feature extractors for FID and KID.

The standard extractor is torchmetrics' Inception-v3 (needs ``torch-fidelity``): from a local weights
file (``inception_weights``, checked weights-only first: :func:`check_inception_weights`) or
downloaded on first use (``inception_metrics=true``, online users). Offline,
the project trains its own extractor, :class:`~domains.media.networks.FeatureCNN`: a small
classifier of the data's classes (or, for unlabelled data, of four rotations, a self-supervised
task) and of :data:`CORRUPTIONS` of real images (noise, colour blobs, shuffled patches, blur), so
that "not a real image" is a direction of its feature space. It is trained once per data set and
cached (:mod:`domains.media.metrics`); its name is part of every metric key (``val/fid_cnn`` vs
``val/fid_inception``); :func:`extractor_digest` identifies it (weights and sorted metadata).

Example:
    >>> net = train_feature_cnn(torch.rand(24, 1, 16, 16) * 2 - 1, torch.arange(24) % 2, steps=2, width=8)
    >>> net.num_features
    32
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from domains.media.networks import FeatureCNN
from pipelines.errors import InputError
from pipelines.files import atomic_write

OFFLINE_EXTRACTOR = "cnn"
INCEPTION = "inception"


RECIPE = "task+corruptions-v1"  # what the extractor learns; part of the cache key: change it when training changes
CORRUPTIONS = ("noise", "smooth_noise", "shuffled_patches", "blurred")


def rotation_task(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-supervised labels for unlabelled images: each image rotated by 0/90/180/270 degrees."""
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(len(images))
    return rotated, labels


def corrupt(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1] that are not real: what an untrained generator draws, built from real ones.

    ``noise``: uniform pixel noise; ``smooth_noise``: colour blobs (noise at 2-8 pixels, upsampled);
    ``shuffled_patches``: the 4x4 grid of patches of a real image permuted (local statistics right,
    layout wrong); ``blurred``: a real image box-blurred (5x5).
    """
    count, channels, height, width = images.shape
    device = images.device
    if kind == "noise":
        return torch.rand(images.shape, generator=generator, device=device) * 2 - 1
    if kind == "smooth_noise":
        side = int(torch.randint(2, 9, (1,), generator=generator, device=device))
        coarse = torch.rand((count, channels, side, side), generator=generator, device=device) * 2 - 1
        return nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    if kind == "shuffled_patches":
        ph, pw = height // 4, width // 4
        out = images.clone()
        grid = images[:, :, : 4 * ph, : 4 * pw].reshape(count, channels, 4, ph, 4, pw).permute(0, 2, 4, 1, 3, 5).reshape(count, 16, channels, ph, pw)
        order = torch.argsort(torch.rand((count, 16), generator=generator, device=device), dim=1)
        grid = grid[torch.arange(count, device=device)[:, None], order]
        out[:, :, : 4 * ph, : 4 * pw] = grid.reshape(count, 4, 4, channels, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(count, channels, 4 * ph, 4 * pw)
        return out
    if kind == "blurred":
        return nn.functional.avg_pool2d(images, 5, stride=1, padding=2, count_include_pad=False)
    raise ValueError(f"unknown corruption {kind!r}; known: {CORRUPTIONS}")


def train_feature_cnn(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int = 200,
    width: int = 16,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> FeatureCNN:
    """Train a :class:`FeatureCNN` on images in [-1, 1] for ``steps`` batches.

    The task: the data's classes when labelled (>= 2), else the four rotations, plus one class per
    :data:`CORRUPTIONS` kind (a third of every batch is corrupted real images or noise). Without the
    corruption classes, features of a classifier of shapes did not tell a one-epoch GAN's colour
    blobs from real images well (see the media README); with them "not a real image" is a
    direction of the feature space.

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
        task_outputs = int(labels.max()) + 1
    else:
        inputs, targets = rotation_task(images)
        task_outputs = 4
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: the weights are initialised on the CPU
        net = FeatureCNN(images.shape[1], task_outputs + len(CORRUPTIONS), width).to(inputs.device)
    sampler = torch.Generator(device=inputs.device).manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1))
    net.train()
    size = min(batch_size, len(inputs))
    for step in range(steps):
        batch = torch.randint(0, len(inputs), (size,), device=inputs.device, generator=sampler)
        real, real_targets = inputs[batch], targets[batch]
        kind = step % len(CORRUPTIONS)
        fake = corrupt(real[: max(size // 2, 1)], CORRUPTIONS[kind], sampler)
        batch_images = torch.cat([real, fake])
        batch_targets = torch.cat([real_targets, torch.full((len(fake),), task_outputs + kind, device=inputs.device)])
        loss = loss_fn(net.logits(batch_images), batch_targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    net.eval()
    describe(net, "classes" if labelled else "rotation", task_outputs)
    return net


def describe(net: FeatureCNN, task: str, task_outputs: int, recipe: str = RECIPE) -> FeatureCNN:
    """Attach what the extractor learnt: ``task`` (classes/rotation), ``task_outputs`` (its first logits), ``recipe``."""
    net.task, net.task_outputs, net.recipe = task, task_outputs, recipe  # type: ignore[attr-defined]
    return net


def extractor_metadata(net: FeatureCNN) -> dict[str, str]:
    """What rebuilds the network, as strings (safetensors metadata)."""
    return {
        "channels": str(net.body[0].in_channels), "num_outputs": str(net.classifier.out_features), "width": str(net.body[0].out_channels),
        "pooling": net.pooling, "task": str(getattr(net, "task", "classes")),
        "task_outputs": str(getattr(net, "task_outputs", net.classifier.out_features)), "recipe": str(getattr(net, "recipe", "")),
    }  # fmt: skip


def extractor_digest(net: FeatureCNN) -> str:
    """Deterministic SHA-256 of an extractor: its tensors (sorted names, dtype, shape, bytes) and canonical metadata.

    Two extractors with equal weights and metadata have the same digest whatever the order of keys
    (the SHA-256 of the file itself depends on how its header was serialised).
    """
    digest = hashlib.sha256()
    state = net.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(json.dumps(extractor_metadata(net), sort_keys=True).encode())
    return digest.hexdigest()


@torch.no_grad()
def accuracy(net: FeatureCNN, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 256) -> float:
    """Accuracy of the extractor's own task on held-out images (``labels=None``: the rotation task), over its task's logits."""
    if labels is None:
        images, labels = rotation_task(images)
    outputs = int(getattr(net, "task_outputs", net.classifier.out_features))
    correct = 0
    for start in range(0, len(images), batch_size):
        correct += int((net.logits(images[start : start + batch_size])[:, :outputs].argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(len(images), 1)


def save_extractor(net: FeatureCNN, path: Path, details: dict) -> Path:
    """Write ``path`` (safetensors) and ``path`` with ``.json`` (digest, task, accuracy), each atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(path, lambda temporary: save_file(state, str(temporary), metadata=extractor_metadata(net)))
    record = {"name": OFFLINE_EXTRACTOR, "sha256": extractor_digest(net), **extractor_metadata(net), **details}
    atomic_write(path.with_suffix(".json"), lambda temporary: temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n"))
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
    describe(net, meta.get("task", "classes"), int(meta.get("task_outputs", meta["num_outputs"])), meta.get("recipe", ""))
    net.eval()
    return net


#: tensors that tell torch-fidelity's FID Inception (the TF-2015 graph: 1008 logits) from other Inception-v3 weights
INCEPTION_SIGNATURE = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1), "fc.weight": (1008, 2048)}


def check_inception_weights(path: str | Path) -> Path:
    """Refuse (``InputError`` naming the file) what torchmetrics/torch-fidelity would not load as the FID Inception:
    a missing file, a file that is not weights-only (``torch.load(weights_only=True)`` refuses pickled code or
    objects), not a ``{name: tensor}`` state dict, or another network's weights. The library itself loads the file
    with ``weights_only=False``: it only gets a file that has passed ``weights_only=True`` here."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"--model.init_args.inception_weights {path}: file not found (a .pth state dict of torch-fidelity's FID Inception, "
            "e.g. weights-inception-2015-12-05-6726825d.pth)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        found = re.search(r"Unsupported (global: GLOBAL [\w.]+|operand \w+)|Unsupported[^\n]*", str(error))  # torch names the global or opcode it refused
        cause = f" ({found.group(0)})" if found else ""  # torch's other text (and its advice to load with weights_only=False) is not shown
        raise InputError(
            f"--model.init_args.inception_weights {path}: not a weights-only file (it holds pickled objects other than tensors, "
            f"or is no torch file at all); refused, nothing in it was run{cause}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f"--model.init_args.inception_weights {path}: expected a state dict (names to tensors), found {type(state).__name__}")
    wrong = {name: tuple(state[name].shape) if name in state else "missing" for name, shape in INCEPTION_SIGNATURE.items() if name not in state or tuple(state[name].shape) != shape}
    if wrong:
        expected = ", ".join(f"{name} {shape}" for name, shape in INCEPTION_SIGNATURE.items())
        raise InputError(f"--model.init_args.inception_weights {path}: not torch-fidelity's FID Inception weights (expected {expected}; found {wrong}). "
                         "torchvision's ImageNet inception_v3 (1000 classes) is another network")  # fmt: skip
    return path


class Uint8Images(nn.Module):
    """Images in [0, 1] to the uint8 images torch-fidelity's Inception takes (KID with a given network, shared with FID)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images * 255).byte())


def inception_metrics(kid_subset_size: int, weights: str | Path | None = None) -> tuple[nn.Module, nn.Module]:
    """torchmetrics' Inception FID/KID (needs ``torch-fidelity``), from the local ``weights`` file (checked by
    :func:`check_inception_weights` first) or, without it, the weights downloaded on first use (online users).
    One network serves both."""
    if weights is not None:
        weights = check_inception_weights(weights)
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        fid_metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights) if weights else None)
    except (ImportError, OSError, RuntimeError) as error:
        text = " ".join(str(error).split()) or type(error).__name__
        cause = text if len(text) <= 300 else text[:300] + " ..."  # the start of a long list of missing tensors is enough
        if weights and not isinstance(error, ImportError):  # e.g. a tensor missing beyond the signature checked above
            raise InputError(f"--model.init_args.inception_weights {weights}: torch-fidelity's Inception did not load it ({cause})") from None
        asked = f"--model.init_args.inception_weights {weights}" if weights else "inception_metrics=true"
        where = "" if weights else " and the Inception weights (downloaded on first use; no internet here? --model.init_args.inception_weights FILE takes a local copy)"
        raise InputError(
            f"{asked} needs torch-fidelity (`pip install torch-fidelity`, which needs a torchvision built for this torch){where}. "
            f"Cause: {cause.rstrip('.')}. The offline metrics (val/fid_cnn) need neither."
        ) from None
    return fid_metric, KernelInceptionDistance(feature=Uint8Images(fid_metric.inception), normalize=True, subset_size=kid_subset_size)
