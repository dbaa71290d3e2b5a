"""Checks of the finance data's files: the training table's columns against the column roles, its
label column (both classes present), and a scoring file (``--data.predict_path``) against the
training columns, value by value.

Every check raises :class:`pipelines.errors.InputError` naming the file, the columns and, for a
value, its row, before anything is trained or written.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch.utilities import rank_zero_warn

from domains.finance.parsing import TimestampZones
from domains.finance.preprocessing import ColumnRoles, TablePreprocessor
from domains.finance.sources import iter_chunks, read_header
from pipelines.errors import InputError
from pipelines.splits import SplitRule
from pipelines.validation import check_unique_columns, describe_rows


TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def check_path_options(path: str | None, predict_path: str | None, label_classes: list[Any] | None = None) -> None:
    """``--data.path`` (CSV, Parquet or ADBench ``.npz``; checked for existence when read), ``--data.predict_path`` (CSV or
    Parquet) and ``--data.label_classes``, whose unquoted ``[no,yes]`` YAML reads as booleans (trial finding: a garbled refusal).

    Example:
        >>> check_path_options(None, None, [False, True])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: --data.label_classes [false, true]: YAML reads unquoted no/yes, off/on and false/true as booleans, ...
    """
    if label_classes is not None and any(isinstance(value, bool) for value in label_classes):
        shown = "[" + ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in label_classes) + "]"
        raise InputError(
            f"--data.label_classes {shown}: YAML reads unquoted no/yes, off/on and false/true as booleans, not as the labels the file "
            "holds. Quote each label as the label column spells it, normal first: --data.label_classes '[\"no\",\"yes\"]'. "
            "(A label column of true/false values needs no option: true is fraud, false normal.)"
        )
    for name, value in (("path", path), ("predict_path", predict_path)):
        if value is not None and Path(value).is_dir():
            raise InputError(f"--data.{name} {value}: file not found (a folder); expected a .csv or .parquet file" + (" or an ADBench .npz" if name == "path" else ""))
        if name == "predict_path" and value is not None and not Path(value).is_file():  # ``path``: when it is read
            raise InputError(f"--data.{name} {value}: file not found" + (" (a folder)" if Path(value).is_dir() else ""))
        if value is not None and not value.lower().endswith(TABLE_SUFFIXES + ((".npz",) if name == "path" else ())):
            raise InputError(f"--data.{name} {value}: expected a .csv or .parquet file" + (" or an ADBench .npz" if name == "path" else ""))


def check_roles_cover(table: pd.DataFrame, roles: ColumnRoles, rule: SplitRule, source_name: str) -> None:
    """Every column of the training table has a role, is the label or the split column, or is listed in ``ignore_columns``."""
    known = {column for column, _ in roles.required()} | set(roles.ignore_columns) | {c for c in (roles.label_column, rule.column) if c}
    unused = [c for c in table.columns if c not in known]
    if unused:
        raise InputError(
            f"{source_name}: column(s) {unused} have no role, so the model would silently leave them out; give each a role "
            "(--data.numeric_columns, amount_columns, boolean_columns, timestamp_columns, categorical_columns, id_columns, label_column) "
            f"or list them in --data.ignore_columns (e.g. --data.ignore_columns '{json.dumps(unused)}')"
        )
    absent = [c for c in roles.ignore_columns if c not in table.columns]
    if absent:
        raise InputError(f"{source_name}: --data.ignore_columns lists {absent}, which the file does not have; its columns are {list(table.columns)}")


def id_hashes(frame: pd.DataFrame, id_columns: list[str]) -> np.ndarray:
    """One 64-bit hash per row of its row identifier, the first of ``id_columns`` (what :func:`check_unique_ids`
    compares; a streamed fit keeps these, 8 bytes a row, instead of the values)."""
    if not id_columns or id_columns[0] not in frame.columns:
        return np.zeros(0, np.uint64)
    return pd.util.hash_pandas_object(frame[id_columns[0]].astype(str), index=False).to_numpy(np.uint64)


def check_unique_ids(hashes: np.ndarray, id_columns: list[str], source_name: str, first_value: Any = None) -> None:
    """Refuse a training table in which the row identifier (the first of ``id_columns``, e.g. ``transaction_id``; later
    ones such as ``account_id`` may repeat) is on several rows: a transaction exported twice or a join that fanned out,
    whose copies a random split puts in train and in test, so the test metrics would be measured partly on rows the
    model was fitted on (trial finding: trained in silence). ``first_value`` names the repeated value when the caller
    has it (rows are counted from 1, the header not counted).

    Example:
        >>> hashes = np.array([1, 2, 3, 2, 2], dtype=np.uint64)
        >>> check_unique_ids(hashes, ["transaction_id", "account_id"], "tx.csv", "t00002")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: tx.csv: the row identifier 'transaction_id' (the first of --data.id_columns) value 't00002' is on rows 2, 4, 5 (3 rows ...
    """
    if len(hashes) == 0:
        return
    order = np.argsort(hashes, kind="stable")
    repeated = np.zeros(len(hashes), bool)
    same = hashes[order][1:] == hashes[order][:-1]
    repeated[order[1:][same]] = True
    repeated[order[:-1][same]] = True
    if not repeated.any():
        return
    first = int(np.flatnonzero(repeated)[0])
    rows = np.flatnonzero(hashes == hashes[first]) + 1
    value = f" value {first_value!r}" if first_value is not None else ""
    raise InputError(
        f"{source_name}: the row identifier {id_columns[0]!r} (the first of --data.id_columns){value} is on {describe_rows(rows)} "
        f"({int(repeated.sum())} rows share an identifier with another row): a transaction exported twice, or a join that fanned out. "
        "Copies of one transaction would land in train and in test, and the test metrics would be measured partly on rows the model "
        "was fitted on. Remove the copies (e.g. pandas drop_duplicates on that column); if the first id column names an entity with "
        "several rows (a customer or an account), list the transaction identifier first"
    )


def check_table_ids(table: pd.DataFrame, id_columns: list[str], source_name: str) -> None:
    """:func:`check_unique_ids` on a table in memory, naming the first repeated value."""
    hashes = id_hashes(table, id_columns)
    repeated = pd.Series(hashes).duplicated(keep=False).to_numpy()
    if repeated.any():
        check_unique_ids(hashes, id_columns, source_name, table[id_columns[0]].iloc[int(np.flatnonzero(repeated)[0])])


def check_both_classes(labels: np.ndarray, label_column: str, label_classes: list[Any], source_name: str) -> None:
    """The parsed 0/1 labels hold both classes: the model learns normal rows, and AUROC, AUPRC and the best-F1 threshold need fraud."""
    normal, fraud = (repr(str(c)) for c in label_classes)
    n_fraud = int(labels.sum())
    if n_fraud == 0:
        raise InputError(
            f"{source_name}: label column {label_column!r} holds only the normal class {normal} ({len(labels)} rows), no fraud "
            f"({fraud}): AUROC, AUPRC and the best-F1 threshold cannot be computed. Check --data.label_classes [normal, fraud], "
            "or train without labels: --data.mode unsupervised --data.label_column null --data.ignore_columns "
            f"[{label_column}] (the threshold is then the alert budget)"
        )
    if n_fraud == len(labels):
        raise InputError(
            f"{source_name}: label column {label_column!r} holds only the fraud class {fraud} ({len(labels)} rows): no row is "
            f"labelled normal ({normal}), and the model learns what normal transactions look like from them. Check --data.label_classes "
            "[normal, fraud] (in that order)"
        )


def check_scoring_columns(path: Path, roles: ColumnRoles, rule: SplitRule, source_name: str) -> list[str]:
    """A scoring file must have the training table's columns (the label column and ignored columns are optional)."""
    columns = read_header(path)
    optional = {roles.label_column, *roles.ignore_columns, rule.column, rule.key}
    expected = [column for column, _ in roles.required()]  # every other training column (check_roles_cover)
    missing = [c for c in expected if c not in columns]
    extra = [c for c in columns if c not in expected and c not in optional]
    if missing or extra:
        raise InputError(
            f"--data.predict_path {path}: the columns differ from training ({source_name}): "
            + "; ".join(part for part in (f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "") if part)
        )
    return columns


def check_scoring_file(
    path: Path, roles: ColumnRoles, rule: SplitRule, source_name: str, label_classes: list[Any], chunk_rows: int, fitted: TablePreprocessor | None = None,
) -> None:  # fmt: skip
    """Columns, then every value of every chunk (streamed, as ``predict`` will read it): a bad value
    anywhere refuses the file, naming its row, before anything is written. With the ``fitted``
    preprocessing, categories it never saw are counted per column and said (:func:`unseen_categories_note`)."""
    check_scoring_columns(path, roles, rule, source_name)
    checker = TablePreprocessor(roles, label_classes=label_classes)  # parsing needs no fitted state
    zones = TimestampZones(fitted.timestamp_zones if fitted is not None else None)  # across chunks; the training kind
    rows, unseen = 0, {column: Counter() for column in (roles.categorical_columns if fitted is not None else [])}
    for offset, chunk in iter_chunks(path, chunk_rows):
        check_unique_columns([str(c) for c in chunk.columns], str(path))
        checker.check_values(chunk, str(path), offset, zones)
        if fitted is not None:
            for column, (text, lacking) in fitted.unseen_categories(chunk).items():
                unseen[column].update(text[lacking])
        rows = offset + len(chunk)
    if rows == 0:
        raise InputError(f"--data.predict_path {path}: the file has no rows (only a header); expected one row per transaction to score")
    note = unseen_categories_note(unseen, rows, fitted, str(path)) if fitted is not None else None
    if note:
        rank_zero_warn(note)


def unseen_categories_note(unseen: dict[str, Counter], rows: int, fitted: TablePreprocessor, source: str) -> str | None:
    """A warning naming the categorical columns whose share of categories unseen in training (scored as
    ``<unknown>``: the column then carries no signal for those rows) is at least 5 % and more than twice
    the training share plus 2 points, e.g. a column spelled another way upstream (``US`` -> ``us``)."""
    lines = []
    for column, counter in unseen.items():
        share, trained = sum(counter.values()) / rows, fitted.unknown_shares.get(column, 0.0)
        if share >= 0.05 and share > 2 * trained + 0.02:
            examples = ", ".join(repr(value) for value, _ in counter.most_common(3))
            lines.append(f"{column!r}: {share:.1%} of the rows hold categories not seen in training (e.g. {examples}; {trained:.1%} in training)")
    if not lines:
        return None
    return (f"{source}: {'; '.join(lines)}. They are scored as <unknown>, so the column carries no signal for them: "
            "if the values are spelled differently upstream, fix the spelling; if they are new, retrain")  # fmt: skip
