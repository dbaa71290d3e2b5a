"""FID/KID in the offline extractor's feature space, against reference statistics computed once per data set.

One extractor per data set: :func:`resolve_extractor` trains it the first time a data set is seen
(or takes ``feature_extractor_weights``) and stores it content-addressed in a cache folder
(``extractors/<data key>.safetensors``, the key a hash of the training split's pixels and labels and
of the training recipe), so every run and test on that data set, champion and challenger alike,
scores with the same network. The reference statistics of a real split (its features, their mean
and covariance) are computed once per extractor and split and stored beside it
(``references/<extractor digest>-<split>-<split hash>.safetensors``). Files are written under a
temporary name and renamed (``os.replace``): a reader sees a complete file or none.

KID uses torchmetrics' unbiased polynomial-kernel MMD over subsets drawn from a seeded generator,
so the same two feature sets always give the same KID.

Example:
    >>> real, fake = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), torch.randn(40, 8) + 3
    >>> stats = reference_statistics(real)
    >>> fid(stats, real) < 1e-6, fid(stats, fake) > 50
    (True, True)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from torchmetrics.image.kid import poly_mmd

from domains.media.features import RECIPE, extractor_digest, load_extractor, save_extractor
from domains.media.networks import FeatureCNN
from pipelines.files import atomic_write

KID_SEED = 0


def tensor_hash(*tensors: torch.Tensor) -> str:
    """SHA-256 of tensors' dtypes, shapes and bytes (CPU, contiguous): a data set's or split's fingerprint."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def extractor_key(images: torch.Tensor, labels: torch.Tensor, settings: dict) -> str:
    """Cache key of the extractor trained on ``images``/``labels`` with ``settings`` (and this module's :data:`RECIPE`)."""
    canonical = json.dumps({"data": tensor_hash(images, labels), "recipe": RECIPE, **settings}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def resolve_extractor(cache: Path, key: str, channels: int, train: Callable[[], tuple[FeatureCNN, dict]]) -> tuple[FeatureCNN, str, bool]:
    """The extractor stored under ``key`` in ``cache``, else ``train()``'s, stored there: ``(net, path, trained)``."""
    path = cache / "extractors" / f"{key}.safetensors"
    if path.is_file():
        return load_extractor(path, channels), str(path), False
    net, details = train()
    save_extractor(net, path, {**details, "cache_key": key})
    return net, str(path), True


@torch.no_grad()
def features_of(net: FeatureCNN, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features ``(N, F)`` in float64 of images in [-1, 1]."""
    rows = [net(images[start : start + batch_size]).double() for start in range(0, len(images), batch_size)]
    return torch.cat(rows) if rows else torch.empty(0, net.num_features, dtype=torch.float64)


def reference_statistics(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """``features`` (kept for KID), their ``mean`` and (unbiased) covariance ``cov``, float64 on the CPU."""
    features = features.double().cpu()
    return {"features": features, "mean": features.mean(0), "cov": torch.cov(features.T).reshape(features.shape[1], features.shape[1])}


def resolve_reference(cache: Path, net: FeatureCNN, split: str, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], str, bool]:
    """Reference statistics of the real ``split`` for ``net``, computed once and stored: ``(stats, path, computed)``."""
    from safetensors.torch import load_file, save_file

    name = f"{extractor_digest(net)[:16]}-{split}-{tensor_hash(images)[:16]}.safetensors"
    path = cache / "references" / name
    if path.is_file():
        return load_file(str(path)), str(path), False
    stats = reference_statistics(features_of(net, images))
    atomic_write(path, lambda temporary: save_file({k: v.contiguous() for k, v in stats.items()}, str(temporary)))
    return stats, str(path), True


def fid(reference: dict[str, torch.Tensor], features: torch.Tensor) -> float:
    """Frechet distance between the reference Gaussian and that of ``features`` (torchmetrics' formula, float64)."""
    features = features.double().cpu()
    mean, cov = features.mean(0), torch.cov(features.T)
    difference = (reference["mean"] - mean).square().sum()
    root = torch.linalg.eigvals(reference["cov"] @ cov).sqrt().real.sum()
    return float(difference + reference["cov"].trace() + cov.trace() - 2 * root)


def kid(reference: dict[str, torch.Tensor], features: torch.Tensor, subset_size: int = 100, subsets: int = 100, seed: int = KID_SEED) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` seeded subsets of ``min(subset_size, N)`` images of each side)."""
    real, fake = reference["features"].double(), features.double().cpu()
    size = min(subset_size, len(real), len(fake))
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        pick_real = torch.randperm(len(real), generator=generator)[:size]
        pick_fake = torch.randperm(len(fake), generator=generator)[:size]
        values.append(poly_mmd(real[pick_real], fake[pick_fake]))
    scores = torch.stack(values)
    return float(scores.mean()), float(scores.std()) if len(scores) > 1 else 0.0


def inception_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as the Inception metrics take them: [0, 1], three channels (grey repeated)."""
    images = (images + 1) / 2
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def inception_scores(metrics: torch.nn.ModuleList, stage: str, fake: torch.Tensor | None, subset_size: int) -> dict[str, float]:
    """Compute and reset torchmetrics' Inception FID/KID (real images added by the caller; ``fake`` on rank zero
    only, ``None`` elsewhere), KID subsets from a seeded generator. Call on every rank."""
    fid_metric, kid_metric = metrics
    if fake is not None:
        fid_metric.update(inception_range(fake), real=False)
        kid_metric.update(inception_range(fake), real=False)
    kid_metric.subset_size = subset_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(KID_SEED)
        kid_mean, kid_std = kid_metric.compute()
    scores = {f"{stage}/fid_inception": float(fid_metric.compute()), f"{stage}/kid_inception": float(kid_mean), f"{stage}/kid_inception_std": float(kid_std)}
    fid_metric.reset()
    kid_metric.reset()
    return scores
