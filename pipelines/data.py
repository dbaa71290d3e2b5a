"""DataLoader defaults and albumentations-from-YAML, shared by every domain."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


#: The most loader workers :func:`default_workers` gives one GPU.
MAX_WORKERS_PER_GPU = 8


def default_workers(num_workers: int | None, gpus: int | None = None, cpus: int | None = None) -> int:
    """Loader worker processes: ``num_workers`` when given, else chosen for what is here.

    Without CUDA: 0. The model on the CPU is the bottleneck (``benchmarks/performance.py``: loaders
    15-190x faster than the model consumes on 2 cores) and workers would take its cores. With CUDA:
    the CPU cores this process may use, less one for the training loop, shared among the GPUs, at
    most ``MAX_WORKERS_PER_GPU``. On an H100 the healthcare loader with its albumentations in the
    main process delivered 0.8x (batch 64) and 0.3x (batch 512) of what the GPU consumed.

    Example:
        >>> default_workers(None, gpus=0, cpus=16), default_workers(None, gpus=1, cpus=16), default_workers(2)
        (0, 8, 2)
    """
    if num_workers is not None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (or unset for the default), got {num_workers}")
        return num_workers
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if not gpus:
        return 0
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return max(0, min(MAX_WORKERS_PER_GPU, (cpus - 1) // gpus))


class UnpaddedDistributedSampler(DistributedSampler):
    """An evaluation sampler for DDP that scores every sample exactly once: rank ``r`` of ``w`` takes
    the indices ``r, r + w, r + 2w, ...`` in order, neither shuffled nor padded.

    torch's ``DistributedSampler`` (which Lightning puts into every loader under DDP) repeats the first
    indices until each rank has the same count: with 207 samples on 2 processes one is scored twice
    and test metrics are off. Here the ranks' counts differ by at most one; torchmetrics states are reduced
    over what each rank really saw (a loss too: :mod:`pipelines.evaluation_means`; ``self.log(..., sync_dist=True)``
    would average the ranks' epoch means as equals).
    Lightning keeps a loader's ``DistributedSampler`` (a subclass included) instead of replacing it.
    ``num_replicas`` and ``rank`` default to the initialised process group's (else 1 and 0).

    Example:
        >>> [list(UnpaddedDistributedSampler(range(5), num_replicas=2, rank=r)) for r in (0, 1)]
        [[0, 2, 4], [1, 3]]
        >>> len(UnpaddedDistributedSampler(range(5), num_replicas=2, rank=1))
        2
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        world, here = distributed_world()
        super().__init__(dataset, num_replicas=world if num_replicas is None else num_replicas, rank=here if rank is None else rank, shuffle=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Any:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def distributed_world() -> tuple[int, int]:
    """``(world size, rank)`` of the initialised default process group, else ``(1, 0)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def make_loader(
    dataset: Dataset, batch_size: int | None, num_workers: int | None = 0, pin_memory: bool | None = None, evaluation: bool = False, **kwargs: Any
) -> DataLoader:
    """A ``DataLoader`` whose workers live across epochs (start-up cost paid once, Lightning #10389)
    and whose memory is pinned when CUDA is present (Lightning then copies batches non-blocking).
    ``num_workers=None`` picks them with :func:`default_workers`.

    ``evaluation=True`` (validation and test loaders): under DDP each process reads its share through
    :class:`UnpaddedDistributedSampler`, so every sample is scored once; in one process nothing changes.

    Example:
        >>> loader = make_loader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
        >>> len(loader)
        2
    """
    num_workers = default_workers(num_workers)
    world = distributed_world()[0]
    if evaluation and world > 1 and kwargs.get("sampler") is None:
        if len(dataset) < world:  # type: ignore[arg-type]  # every rank raises it: none is left waiting
            raise ValueError(
                f"an evaluation split of {len(dataset)} sample(s) for {world} DDP processes: each process scores "  # type: ignore[arg-type]
                "samples of its own and needs at least one (a process with none would wait for the others forever); "
                "use a larger split or fewer processes (--trainer.devices)"
            )
        kwargs["sampler"] = UnpaddedDistributedSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        **kwargs,
    )


#: An albumentations pipeline as YAML gives it: ``[{"HorizontalFlip": {"p": 0.5}}, ...]``.
AugmentSpec = list[dict[str, dict[str, Any]]]


def build_albumentations(spec: AugmentSpec | None) -> Any:
    """Build an ``albumentations.Compose`` from ``[{"HorizontalFlip": {"p": 0.5}}, ...]``, or ``None``.

    Validated at once, so a typo fails before any training: each transform is built with
    albumentations' ``strict=True``, which refuses arguments the transform does not take.

    Example:
        >>> build_albumentations([{"HorizontalFlip": {"p": 0.5}}]).transforms
        [HorizontalFlip(p=0.5)]
        >>> build_albumentations([{"HorizontalFlipp": {}}])
        Traceback (most recent call last):
        ...
        ValueError: augment: albumentations has no transform 'HorizontalFlipp' (see albumentations' documentation)
    """
    if not spec:
        return None
    import albumentations as A

    steps = []
    for item in spec:
        if not isinstance(item, dict) or len(item) != 1:
            raise ValueError(f"augment: each entry must be one {{TransformName: {{arguments}}}} mapping, got {item!r}")
        ((name, kwargs),) = item.items()
        transform = getattr(A, name, None)
        if not isinstance(transform, type):
            raise ValueError(f"augment: albumentations has no transform {name!r} (see albumentations' documentation)")
        try:
            steps.append(transform(**(kwargs or {}), strict=True))  # strict: unknown arguments are errors
        except (TypeError, ValueError) as error:
            raise ValueError(f"augment: invalid arguments for {name}: {error}") from None
    return A.Compose(steps)
