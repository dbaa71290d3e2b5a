"""The stratified train/val/test split of the healthcare data (``split stratified``, or a source without
an official split); the hashed split is :func:`pipelines.splits.hash_split`."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Assign train/val/test per item, keeping class proportions (first label for multi-label)."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) and sum below 1")
    strata = labels.argmax(1) if labels.ndim == 2 else labels
    rng = np.random.default_rng(seed)
    split = np.full(len(labels), "train", dtype=object)
    for value in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == value))
        n_val, n_test = round(len(members) * val_fraction), round(len(members) * test_fraction)
        split[members[:n_val]] = "val"
        split[members[n_val : n_val + n_test]] = "test"
    return split.astype(str)
