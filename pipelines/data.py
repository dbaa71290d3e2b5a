"""DataLoader defaults and albumentations-from-YAML, shared by every domain."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


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


def make_loader(dataset: Dataset, batch_size: int | None, num_workers: int | None = 0, pin_memory: bool | None = None, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` whose workers live across epochs (start-up cost paid once, Lightning #10389)
    and whose memory is pinned when CUDA is present (Lightning then copies batches non-blocking).
    ``num_workers=None`` picks them with :func:`default_workers`.

    Example:
        >>> loader = make_loader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
        >>> len(loader)
        2
    """
    num_workers = default_workers(num_workers)
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
