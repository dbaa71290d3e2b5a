"""Which split (``train``/``val``/``test``) each item of the healthcare data goes to
(``MedicalImageDataModule.split_assignment``): the source's official split (a MedMNIST ``.npz``, the
labels CSV's ``split`` column), a stratified split (:func:`domains.healthcare.splitting.stratified_split`),
or a hash of a labels CSV column (``--data.split_by hash``, :func:`pipelines.splits.hash_split`). A
split left empty, or a ``--data.group_column`` value (a patient) found in two splits, is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.errors import InputError
from pipelines.splits import SplitRule, check_column, check_filled, check_groups, hash_split
from domains.healthcare.readers import LabeledImages
from domains.healthcare.splitting import stratified_split


def labels_csv_column(labels_csv: str, column: str, option: str, items: int) -> np.ndarray:
    """One column of the labels CSV, one value per item (the reader keeps the CSV's row order)."""
    import pandas as pd

    table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    check_column(list(table.columns), column, option, str(labels_csv))
    if len(table) != items:
        raise InputError(f"{labels_csv}: {len(table)} rows but {items} items were read; --data.{option} needs one row per image")
    return table[column].to_numpy()


def assign_splits(source: LabeledImages, rule: SplitRule, hp: Any) -> np.ndarray:
    """The split of each item of ``source`` under ``rule`` and the data module's options ``hp`` (its ``hparams``)."""
    where = str(hp.labels_csv or hp.npz_path or "the synthetic set")
    if rule.stable:
        if not hp.labels_csv:
            raise InputError(f"{rule.describe()} hashes a column of --data.labels_csv; {where} has none")
        keys = labels_csv_column(hp.labels_csv, rule.key, "split_key", len(source.labels))
        empty = np.flatnonzero(np.char.str_len(keys.astype(str)) == 0)
        if len(empty):
            raise InputError(f"{where} row {empty[0] + 1}, column {rule.key!r} (--data.split_key): no key value; every row needs one")
        assignment = hash_split(keys, rule.val_fraction, rule.test_fraction, rule.seed)
    elif source.split is None or hp.split == "stratified":
        assignment = stratified_split(source.labels, hp.val_fraction, hp.test_fraction, hp.split_seed)
    else:
        assignment = source.split
    check_filled(assignment, rule if rule.stable or source.split is None or hp.split == "stratified" else SplitRule("column", column="split"), where)
    if hp.group_column:
        check_groups(labels_csv_column(hp.labels_csv, hp.group_column, "group_column", len(source.labels)), assignment, hp.group_column, where)
    return assignment
