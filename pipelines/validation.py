"""The validation layer every domain's reader uses: values, labels and columns are checked here.

Each check raises :class:`pipelines.errors.InputError` (a ``ValueError``) naming the file, the
rows (1-based data rows, the header not counted) and the column, and saying what was expected, so
that ``python -m pipelines.run`` refuses the input with exit status 2 before anything is written.

Rules, for every domain:

- **Values**: NaN, +-inf and magnitudes beyond float32's range (``3.4e38``: such a value becomes inf
  in the float32 tensors the models use) are refused. Readers that allow missing values (e.g.
  finance's categorical columns) say so in their own documentation.
- **Labels**: a label that is one edit away from another one (``covid`` / ``COVID-19`` / ``covid19``)
  or a class with fewer than ``min_rows`` rows is refused unless the user lists the classes
  (``class_names``); a label outside a declared list is refused with the closest declared name.
- **Columns**: duplicated headers are refused (pandas would silently rename the second to ``x.1``).
- **Text files** (CSV/TSV): :mod:`pipelines.csv_text` (UTF-8, the delimiter, one value per header column).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pipelines.errors import InputError, did_you_mean

#: The largest finite float32: larger magnitudes turn into inf in a float32 tensor.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def describe_rows(rows: Sequence[int] | np.ndarray, limit: int = 5) -> str:
    """``row 3`` / ``rows 3, 9, 12`` / ``rows 3, 9, 12, 20, 31 and 7 more`` (rows as given).

    Example:
        >>> describe_rows([3]), describe_rows([1, 2, 3, 4, 5, 6, 7], limit=3)
        ('row 3', 'rows 1, 2, 3 and 4 more')
    """
    rows = [int(r) for r in rows]
    head = ", ".join(str(r) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {head}{more}"


def non_finite_problem(values: np.ndarray) -> tuple[np.ndarray, str] | None:
    """Where ``values`` (numeric, any shape with rows first) hold NaN, inf or float32 overflow.

    Returns ``(mask over the first axis, what was found)`` or ``None`` when every value is fine.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "fc" or values.size == 0:
        if values.dtype.kind in "iu" and values.size and np.abs(values.astype(np.float64)).max() > FLOAT32_MAX:
            return np.abs(values.reshape(len(values), -1).astype(np.float64)).max(axis=1) > FLOAT32_MAX, "a value beyond float32's range"
        return None
    flat = values.reshape(len(values), -1) if values.ndim > 1 else values.reshape(-1, 1)
    kinds = []
    nan, inf = np.isnan(flat), np.isinf(flat)
    with np.errstate(invalid="ignore", over="ignore"):
        huge = ~inf & ~nan & (np.abs(flat.astype(np.float64)) > FLOAT32_MAX)
    for mask, label in ((nan, "NaN"), (inf, "inf"), (huge, f"a magnitude beyond float32's range ({FLOAT32_MAX:.3g})")):
        if mask.any():
            kinds.append(label)
    if not kinds:
        return None
    return (nan | inf | huge).any(axis=1), " and ".join(kinds)


def check_finite(values: Any, where: str, column: str | None = None, first_row: int = 1) -> None:
    """Refuse NaN, inf and float32 overflow in ``values`` (rows first), naming rows and column.

    Args:
        values: an array (or a pandas column); rows along the first axis.
        where: the file or split, as the user knows it.
        column: the column name, when ``values`` is one column.
        first_row: the number of the first row in the message (1: rows numbered from 1).

    Example:
        >>> check_finite(np.array([1.0, np.inf, 2.0]), "tx.csv", "amount")
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: tx.csv: column 'amount' holds inf at row 2; every value must be a finite number within float32's range (|x| <= 3.4e+38)
    """
    found = non_finite_problem(np.asarray(values))
    if found is None:
        return
    mask, what = found
    rows = np.flatnonzero(mask) + first_row
    place = f"column {column!r} holds" if column is not None else "holds"
    raise InputError(f"{where}: {place} {what} at {describe_rows(rows)}; every value must be a finite number within float32's range (|x| <= {FLOAT32_MAX:.2g})")


def check_finite_columns(frame: Any, where: str, columns: Iterable[str], first_row: int = 1) -> None:
    """:func:`check_finite` over several numeric columns of a pandas DataFrame, one message for all."""
    problems = []
    for column in columns:
        found = non_finite_problem(np.asarray(frame[column], dtype=np.float64))
        if found is not None:
            mask, what = found
            problems.append(f"column {column!r} holds {what} at {describe_rows(np.flatnonzero(mask) + first_row)}")
    if problems:
        raise InputError(f"{where}: " + "; ".join(problems) + f"; every value must be a finite number within float32's range (|x| <= {FLOAT32_MAX:.2g})")


def check_unique_columns(columns: Sequence[str], where: str) -> None:
    """Refuse a header that names a column twice (pandas would rename the second ``x.1`` and use neither as meant).

    Example:
        >>> check_unique_columns(["amount", "merchant", "amount"], "tx.csv")
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: tx.csv: the header names column 'amount' 2 times (columns 1, 3); every column name must be unique
    """
    counts = Counter(columns)
    repeated = [name for name, n in counts.items() if n > 1]
    if repeated:
        parts = [f"column {name!r} {counts[name]} times (columns {', '.join(str(i + 1) for i, c in enumerate(columns) if c == name)})" for name in repeated]
        raise InputError(f"{where}: the header names " + "; ".join(parts) + "; every column name must be unique")


def _normalised(label: str) -> str:
    return "".join(ch for ch in str(label).lower() if ch.isalnum())


def confusable_labels(labels: Iterable[Any], cutoff: float = 0.8) -> list[tuple[str, str]]:
    """Pairs of labels that look like one class spelt two ways: equal once case, spaces and
    punctuation are dropped, or of difflib similarity ``>= cutoff`` (``covid`` vs ``covid19``).

    Example:
        >>> confusable_labels(["normal", "covid", "COVID-19", "pneumonia"])
        [('COVID-19', 'covid')]
        >>> confusable_labels(["benign", "malignant", "normal", "grade1", "grade2"])
        []
    """
    names = sorted({str(label) for label in labels})
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            na, nb = _normalised(a), _normalised(b)
            if re.search(r"\d", na) and re.search(r"\d", nb) and re.sub(r"\d", "", na) == re.sub(r"\d", "", nb) and na != nb:
                continue  # numbered classes (grade1, grade2) are meant to differ
            if na == nb or difflib.SequenceMatcher(None, na, nb).ratio() >= cutoff or (min(len(na), len(nb)) >= 4 and (na.startswith(nb) or nb.startswith(na))):
                pairs.append((a, b))
    return pairs


def check_labels(
    counts: Mapping[Any, int],
    where: str,
    declared: Sequence[Any] | None = None,
    min_rows: int = 2,
    option: str = "--data.class_names",
    unit: str = "row",
    first_row: Callable[[Any], str] | None = None,
) -> None:
    """Check a label set (label -> number of rows) before it defines the classes of a model.

    With ``declared`` class names, every label must be one of them (the closest is suggested).
    Without, a label spelt like another one or a class with fewer than ``min_rows`` rows is refused:
    list the classes with ``option`` when they are really meant. ``unit`` names what is counted
    (``row``; ``image`` for a folder per class). ``first_row(label)``, when given, names where a refused label
    first occurs (e.g. ``fleet.csv row 121``).

    Example:
        >>> check_labels({"normal": 40, "pneumonia": 38, "pnuemonia": 1}, "labels.csv")
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: labels.csv: labels 'pneumonia' (38 rows) and 'pnuemonia' (1 row) look like one class spelt two ways; fix the labels, or list every class with --data.class_names if both are meant
    """
    at = (lambda label: f", first at {first_row(label)}") if first_row is not None else (lambda label: "")  # noqa: E731
    if declared is not None:
        known = [str(name) for name in declared]
        unknown = [label for label in counts if str(label) not in known]
        if unknown:
            parts = [f"{str(label)!r} ({counts[label]} {unit}{'s' if counts[label] != 1 else ''}{at(label)}){did_you_mean(str(label), known)}" for label in unknown]
            raise InputError(f"{where}: label {', '.join(parts)} is not one of the declared classes {known} ({option})")
        return
    rows = lambda label: f"{counts[label]} {unit}{'s' if counts[label] != 1 else ''}"  # noqa: E731
    by_name = {str(label): label for label in counts}
    for a, b in confusable_labels(by_name):
        first, second = sorted((by_name[a], by_name[b]), key=lambda label: -counts[label])
        raise InputError(
            f"{where}: labels {str(first)!r} ({rows(first)}) and {str(second)!r} ({rows(second)}{at(second)}) look like one class spelt two ways; "
            f"fix the labels, or list every class with {option} if both are meant"
        )
    rare = [label for label in counts if counts[label] < min_rows]
    if rare:
        parts = ", ".join(f"{str(label)!r} ({rows(label)}{at(label)})" for label in rare)
        raise InputError(f"{where}: class {parts} has fewer than {min_rows} {unit}s, too few to train and evaluate; fix the labels, or list every class with {option} if it is meant")


def check_model_label(value: str | None, option: str) -> None:
    """Refuse a model name or version the server cannot show: it goes into HTTP headers
    (``X-Model-Name``/``X-Model-Version``, latin-1 without line breaks) and a metrics label.

    ``None`` (not given) passes; otherwise 1 to 128 printable ASCII characters, no spaces at either end.

    Example:
        >>> check_model_label("fraud-detector", "--model_name")
        >>> check_model_label("v1\\nX-Admin: yes", "--model_version")
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: --model_version 'v1\\nX-Admin: yes': expected 1 to 128 printable ASCII characters (letters, digits, . _ - + : @ /, inner spaces), no control characters or line breaks: it is sent in HTTP headers and metrics labels
    """
    if value is None:
        return
    text = str(value)
    if not (1 <= len(text) <= 128) or text != text.strip() or any(not (0x20 <= ord(ch) <= 0x7E) for ch in text):
        raise InputError(
            f"{option} {text!r}: expected 1 to 128 printable ASCII characters (letters, digits, . _ - + : @ /, inner spaces), "
            "no control characters or line breaks: it is sent in HTTP headers and metrics labels"
        )
