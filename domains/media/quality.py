"""Improved precision and recall, and a nearest-neighbour memorisation check, in an extractor's feature space.

**Precision and recall** (Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing
Generative Models", NeurIPS 2019): each set of features approximates its manifold by the union of
balls centred on its points, each ball's radius the distance to the point's ``k``-th nearest other
point of the same set (``k = 3``, the paper's choice). *Precision* is the share of generated samples
inside the real manifold (are samples realistic?); *recall* the share of real images inside the
generated manifold (is the data's variety covered?). Both lie in [0, 1]: held-back real images score
near 1 on both, noise near 0 on both, a model that draws one good image over and over high precision
and low recall. Both depend on the set sizes: compare them at equal sizes only.

**Memorisation** (the training set's nearest neighbour): for every generated sample, its distance to
the nearest *training* image; for every held-back real image (validation or test split, never trained
on), the same distance. A model that generalises draws samples as far from the training set as new
real images are; a model that copies draws samples at distance ~0. Two numbers:

- ``memorised_share``: the share of samples closer to their nearest training image than the
  ``COPY_PERCENTILE`` (5 %) quantile of the held-back real images' distances. About 0.05 for samples
  as new as real images, 1.0 for a model that returns training images (the higher, the more copying).
- ``train_distance_ratio``: the median nearest-training distance of the samples over that of the
  held-back real images. About 1 like new real images, near 0 when copying, well above 1 for samples
  off the data (noise); read it with precision, which says whether samples are realistic at all.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> real, other = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    >>> p, r = precision_recall(real, other)
    >>> p > 0.8 and r > 0.8, precision_recall(real, other + 10)
    (True, (0.0, 0.0))
    >>> train = torch.randn(300, 8, generator=g)
    >>> memorisation(train, held_back=real, samples=train[:100])["memorised_share"]
    1.0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from domains.media.features import OFFLINE_EXTRACTOR
from domains.media.metrics import features_of, fid, kid, resolve_reference
from domains.media.networks import FeatureCNN

NEIGHBOURS = 3  #: k of the k-NN manifold (Kynkäänniemi et al. 2019)
COPY_PERCENTILE = 0.05  #: quantile of held-back real images' nearest-training distances below which a sample counts as memorised
CHUNK = 256  #: query rows per distance block (memory: CHUNK x points doubles: 120 MB against 60,000 training images)


def _blocks(queries: torch.Tensor, points: torch.Tensor):
    """``(start, distances)`` for blocks of ``CHUNK`` query rows: Euclidean distances to every point, float64."""
    points = points.double()
    for start in range(0, len(queries), CHUNK):
        yield start, torch.cdist(queries[start : start + CHUNK].double(), points)


def nearest_distances(queries: torch.Tensor, points: torch.Tensor, k: int = 1, exclude_self: bool = False) -> torch.Tensor:
    """Distance of each query to its ``k``-th nearest point ``(N,)``; ``exclude_self``: ``queries`` is ``points``,
    a point is not its own neighbour."""
    needed = k + 1 if exclude_self else k
    if len(points) < needed:
        raise ValueError(f"{k} nearest neighbours need at least {needed} points, got {len(points)}")
    rows = []
    for start, distances in _blocks(queries, points):
        if exclude_self:
            index = torch.arange(start, start + len(distances))
            distances[torch.arange(len(distances)), index] = float("inf")
        rows.append(torch.topk(distances, k, dim=1, largest=False).values[:, -1])
    return torch.cat(rows) if rows else torch.empty(0, dtype=torch.float64)


def manifold_share(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of ``queries`` within the ball of at least one point (``radii``: one per point)."""
    inside = [(distances <= radii.double()[None]).any(1) for _, distances in _blocks(queries, points)]
    return float(torch.cat(inside).double().mean()) if inside else 0.0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = NEIGHBOURS) -> tuple[float, float]:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold), features ``(N, F)``."""
    real, fake = real.double().cpu(), fake.double().cpu()
    precision = manifold_share(fake, real, nearest_distances(real, real, k, exclude_self=True))
    recall = manifold_share(real, fake, nearest_distances(fake, fake, k, exclude_self=True))
    return precision, recall


class TrainingNeighbours:
    """The training split's features and the held-back real images' distances to their nearest training
    image: computed once per split, then :meth:`memorisation` of each evaluation's samples is cheap."""

    def __init__(self, train: torch.Tensor, held_back: torch.Tensor) -> None:
        self.train = train.double().cpu()
        self.held_back = nearest_distances(held_back.double().cpu(), self.train)

    def memorisation(self, samples: torch.Tensor, percentile: float = COPY_PERCENTILE) -> dict[str, float]:
        """``memorised_share`` and ``train_distance_ratio`` of ``samples``' features (see the module docstring)."""
        fake = nearest_distances(samples.double().cpu(), self.train)
        threshold = torch.quantile(self.held_back, percentile)
        return {
            "memorised_share": float((fake <= threshold).double().mean()),
            "train_distance_ratio": float(fake.median() / self.held_back.median().clamp_min(1e-12)),
        }


def training_neighbours(cache: Path, extractor: FeatureCNN, datamodule: Any, held_back: torch.Tensor) -> TrainingNeighbours:
    """:class:`TrainingNeighbours` of the data module's whole training split (features computed once per extractor
    and stored in ``cache`` like a reference: :func:`~domains.media.metrics.resolve_reference`) and ``held_back`` features."""
    images, _ = datamodule.split_tensors("train")
    train, _, _ = resolve_reference(cache, extractor, "train", images.to(next(extractor.parameters()).device))
    return TrainingNeighbours(train["features"], held_back)


def memorisation(train: torch.Tensor, held_back: torch.Tensor, samples: torch.Tensor, percentile: float = COPY_PERCENTILE) -> dict[str, float]:
    """:meth:`TrainingNeighbours.memorisation` in one call (features ``(N, F)``)."""
    return TrainingNeighbours(train, held_back).memorisation(samples, percentile)


@torch.no_grad()
def offline_scores(
    extractor: FeatureCNN, stage: str, reference: dict[str, torch.Tensor], fake: torch.Tensor, labels: torch.Tensor,
    kid_subset_size: int, condition_classes: int, neighbours: TrainingNeighbours | None = None, k: int = NEIGHBOURS,
) -> dict[str, float]:  # fmt: skip
    """Scores of generated images ``fake`` (in [-1, 1], generated for ``labels``) in ``extractor``'s feature space,
    against the real split's ``reference`` statistics, keys ``{stage}/<metric>_cnn``:

    - ``fid``, ``kid`` (seeded subsets), ``kid_std``;
    - ``precision``, ``recall`` (k-NN manifolds, against the split's first ``len(fake)`` real images: equal
      sizes, and the same labels the samples were generated for);
    - ``memorised_share``, ``train_distance_ratio`` (given the training split's ``neighbours``);
    - ``real_share``: the share the extractor takes for real (none of its corruption classes wins);
    - ``class_acc``: for conditional models, the share classified as the class requested, and ``class_balanced_acc``
      its mean over the classes (chance ``1 / classes`` whatever the label balance: :func:`balanced_accuracy`);
    - ``real_class_acc`` and ``real_class_balanced_acc``: the same for the split's real images (the extractor's
      own accuracy: the ceiling of the two above).
    """
    features = features_of(extractor, fake)
    kid_mean, kid_std = kid(reference, features, kid_subset_size)
    name = OFFLINE_EXTRACTOR
    scores = {f"{stage}/fid_{name}": fid(reference, features), f"{stage}/kid_{name}": kid_mean, f"{stage}/kid_{name}_std": kid_std}
    real = reference["features"][: len(features)]
    if min(len(real), len(features)) > k:
        precision, recall = precision_recall(real, features[: len(real)], k)
        scores.update({f"{stage}/precision_{name}": precision, f"{stage}/recall_{name}": recall})
    if neighbours is not None:
        scores.update({f"{stage}/{key}_{name}": value for key, value in neighbours.memorisation(features).items()})
    outputs = int(getattr(extractor, "task_outputs", extractor.classifier.out_features))
    logits = torch.cat([extractor.logits(fake[i : i + 256]) for i in range(0, len(fake), 256)])
    if outputs < logits.shape[1]:
        scores[f"{stage}/real_share_{name}"] = float((logits.argmax(1) < outputs).float().mean())
    if condition_classes and getattr(extractor, "task", "classes") == "classes" and outputs == condition_classes:
        labels = labels.cpu()
        predicted = logits[:, :outputs].argmax(1).cpu()
        scores[f"{stage}/class_acc_{name}"] = float((predicted == labels).float().mean())
        scores[f"{stage}/class_balanced_acc_{name}"] = balanced_accuracy(predicted, labels)
        # the ceiling: the extractor's own accuracy on the real images of the same labels (logits from the stored features)
        with torch.no_grad():
            real_logits = extractor.classifier(real[: len(labels)].to(logits.device, logits.dtype))
        real_predicted = real_logits[:, :outputs].argmax(1).cpu()
        scores[f"{stage}/real_class_acc_{name}"] = float((real_predicted == labels[: len(real_predicted)]).float().mean())
        scores[f"{stage}/real_class_balanced_acc_{name}"] = balanced_accuracy(real_predicted, labels[: len(real_predicted)])
    return scores


def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over the classes present in ``labels`` of the share of their items ``predicted`` as that class.

    With imbalanced labels plain accuracy rewards ignoring the label: a generator that draws only the majority class
    scores that class's share (BreastMNIST: 0.73); balanced, it scores ``1 / classes`` like any label-blind one.

    Example:
        >>> balanced_accuracy(torch.tensor([1, 1, 1, 1]), torch.tensor([0, 1, 1, 1]))
        0.5
    """
    shares = [float((predicted[labels == c] == c).float().mean()) for c in labels.unique().tolist()]
    return sum(shares) / len(shares)
