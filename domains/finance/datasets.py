"""Datasets of encoded transactions: the training splits (in memory) and the scoring stream.

``EncodedRows`` serves whole batches of the encoded splits; ``ScoringStream`` reads a file (or a
frame) in chunks, encodes each with the fitted preprocessing (which checks every value of the chunk
and raises :class:`pipelines.errors.InputError` naming the file, row and column) and keeps the
original values for the predictions file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from domains.finance.preprocessing import TablePreprocessor
from domains.finance.sources import iter_chunks


def identity(batch: Any) -> Any:
    """The collate function of pre-batched datasets."""
    return batch


class EncodedRows(Dataset):
    """Encoded rows served a whole batch at a time (``__getitems__``: no per-row collation)."""

    def __init__(self, arrays: dict[str, np.ndarray], rows: np.ndarray, fit_rows: np.ndarray) -> None:
        self.numeric = torch.from_numpy(arrays["numeric"])
        self.categorical = torch.from_numpy(arrays["categorical"])
        self.label = torch.from_numpy(arrays["label"])
        self.rows = torch.from_numpy(rows.astype(np.int64))
        self.fit_rows = torch.from_numpy(fit_rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return {
            "numeric": self.numeric[index], "categorical": self.categorical[index], "label": self.label[index],
            "row": self.rows[index], "fit_row": self.fit_rows[index],
        }  # fmt: skip

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


class ScoringStream(IterableDataset):
    """Rows of a file (or frame) in chunks, each encoded with the fitted preprocessing and carrying the
    original values (``raw``, a DataFrame) so that predictions reproduce every input row.

    Chunks are shared round-robin between DDP ranks and DataLoader workers.
    """

    def __init__(self, source: Path | pd.DataFrame, name: str, preprocessor: TablePreprocessor, chunk_rows: int, row_numbers: np.ndarray | None = None) -> None:
        self.source, self.name, self.preprocessor = source, name, preprocessor
        self.chunk_rows, self.row_numbers = chunk_rows, row_numbers

    def _shard(self) -> tuple[int, int]:
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        worker = get_worker_info()
        if worker is not None:
            return rank * worker.num_workers + worker.id, world * worker.num_workers
        return rank, world

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, shards = self._shard()
        for i, (offset, chunk) in enumerate(iter_chunks(self.source, self.chunk_rows)):
            if i % shards != shard:
                continue
            encoded = self.preprocessor.transform(chunk, self.name, offset if self.row_numbers is None else self.row_numbers[offset:])
            rows = self.row_numbers[offset : offset + len(chunk)] if self.row_numbers is not None else np.arange(offset, offset + len(chunk))
            yield {
                "numeric": torch.from_numpy(encoded["numeric"]),
                "categorical": torch.from_numpy(encoded["categorical"]),
                "label": torch.from_numpy(encoded["label"]),
                "row": torch.from_numpy(np.asarray(rows, dtype=np.int64)),
                "out_of_range": torch.from_numpy(encoded["out_of_range"]),
                # a DataFrame is a leaf for Lightning's device transfer (lists would be walked element by element)
                "raw": chunk,
            }
