"""DataLoader defaults shared by every domain."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def make_loader(dataset: Dataset, batch_size: int | None, num_workers: int = 0, pin_memory: bool | None = None, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` whose workers live across epochs (start-up cost paid once, Lightning #10389)
    and whose memory is pinned when CUDA is present (Lightning then copies batches non-blocking).

    Example:
        >>> loader = make_loader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
        >>> len(loader)
        2
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        **kwargs,
    )
