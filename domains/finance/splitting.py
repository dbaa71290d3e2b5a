"""The ``train``/``val``/``test`` assignment of transaction rows (``TransactionDataModule.split_assignment``).

Under ``split_by random`` the split is seeded by ``split_seed`` and depends on the mode:

- ``semi_supervised``: normal rows are split ``train / val / test`` by the fractions; fraud rows
  never train and are shared between val and test in the ratio ``val_fraction : test_fraction``;
- ``unsupervised``: every row may train; the split is stratified by label when there is one.

Under a stable rule (``hash``, ``time``, ``column``: :mod:`pipelines.splits`) fraud rows follow the
rule. Every assignment is refused (:class:`pipelines.errors.InputError`) when a split is empty,
when ``semi_supervised`` has no normal training row, or when val or test lacks a class.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.errors import InputError
from pipelines.splits import SplitRule, assign, check_filled


def split_rows(
    table: pd.DataFrame, labels: np.ndarray | None, rule: SplitRule, mode: str, source_name: str, val: float, test: float, seed: int,
) -> np.ndarray:
    """``train``/``val``/``test`` per row of ``table`` (``labels``: 0/1 per row, or None); ``val``, ``test`` and
    ``seed`` are the data options' fractions and seed of the random split."""
    check_mode(labels, mode)
    stable = assign(rule, table, source_name) if rule.stable else None
    return split_of(len(table), labels, stable, rule, mode, source_name, val, test, seed)


def check_mode(labels: np.ndarray | None, mode: str) -> None:
    if mode == "semi_supervised" and labels is None:
        raise InputError("--data.mode semi_supervised trains on rows labelled normal: set --data.label_column, or use --data.mode unsupervised")


def split_of(
    n: int, labels: np.ndarray | None, stable: np.ndarray | None, rule: SplitRule, mode: str, source_name: str, val: float, test: float, seed: int,
) -> np.ndarray:
    """:func:`split_rows` of ``n`` rows whose stable rule's assignment (``pipelines.splits.assign``, None under
    ``random``) is already known: a table streamed in chunks (``domains.finance.streaming``) gets the same rows per split."""
    check_mode(labels, mode)
    rng = np.random.default_rng(seed)
    split = np.full(n, "train", dtype=object)
    if rule.stable:
        split = np.asarray(stable).astype(object)
    elif mode == "semi_supervised":
        normal = rng.permutation(np.flatnonzero(labels == 0))
        n_val, n_test = round(len(normal) * val), round(len(normal) * test)
        split[normal[:n_val]], split[normal[n_val : n_val + n_test]] = "val", "test"
        fraud = rng.permutation(np.flatnonzero(labels == 1))
        n_fraud_val = round(len(fraud) * val / (val + test))
        split[fraud[:n_fraud_val]], split[fraud[n_fraud_val:]] = "val", "test"
    else:
        strata = labels if labels is not None else np.zeros(n)
        for value in np.unique(strata):
            members = rng.permutation(np.flatnonzero(strata == value))
            n_val, n_test = round(len(members) * val), round(len(members) * test)
            split[members[:n_val]], split[members[n_val : n_val + n_test]] = "val", "test"
    check_filled(split, rule, source_name)
    if rule.stable and mode == "semi_supervised" and not (labels[split == "train"] == 0).any():
        raise InputError(f"{source_name}: the train split has no normal row under {rule.describe()} (semi_supervised trains on normal rows)")
    if labels is not None:
        for name in ("val", "test"):
            members = labels[split == name]
            if members.min() == members.max():
                raise InputError(
                    f"{source_name}: the {name} split gets no {'fraud' if members.max() == 0 else 'normal'} row "
                    f"({int(labels.sum())} fraud rows of {n}, split by {rule.describe()}): "
                    "AUROC, AUPRC and the threshold need both classes in val and test; add labelled rows or change the fractions"
                )
    return split.astype(str)
