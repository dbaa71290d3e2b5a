"""Class labels of a healthcare data set: checked spellings and counts, and an explicit positive class.

- Labels go through :func:`pipelines.validation.check_labels`: without ``--data.class_names``, two
  labels spelt alike (``covid`` / ``COVID-19``) or a class with fewer than 2 items are refused; with
  it, a label outside the list is refused with the closest declared name and the first row holding it.
- A **binary** task has one positive class: the probability column ``prob_<positive>``, AUROC, F1 and
  the 0.5 threshold are about it. It is never chosen by sort order alone:

  1. ``--data.positive_class NAME`` names it;
  2. else, when exactly one of the two names means "no finding" (:data:`NEGATIVE_NAMES`: ``normal``,
     ``negative``, ``healthy``, ``benign``, ``control``, ``no finding``, ``0``...), the other one is;
  3. else, with ``--data.class_names`` declared, the second declared name is (you wrote the order);
  4. else the data is refused with a message asking for ``--data.positive_class``.

  MedMNIST ``.npz`` labels are integers, where 1 is the positive class by convention (rule 2: ``0``
  means negative). The positive class is saved in the checkpoint with the class names, printed at
  the start of a run, and named in the metrics of binary runs (``val/prevalence_<positive>``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from pipelines.errors import InputError, did_you_mean
from pipelines.validation import check_labels

#: Names (case, spaces and punctuation ignored) that mean "no finding" in a binary label set.
NEGATIVE_NAMES = frozenset({"normal", "negative", "neg", "healthy", "benign", "control", "nofinding", "absent", "no", "false", "0"})


def _key(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def check_label_counts(counts: Counter, where: str, declared: Sequence[str] | None, first_row: dict[str, str] | None = None) -> None:
    """:func:`check_labels` with the first row of each label the refusal names added to the message (an undeclared
    label; two spellings of one class; a class with too few rows), so that it can be found in a long table."""
    try:
        check_labels(dict(counts), where, declared=list(declared) if declared is not None else None, min_rows=2)
    except InputError as error:
        if first_row:
            if declared is not None:
                named = [label for label in counts if str(label) not in [str(d) for d in declared]]
            else:
                named = [label for label in counts if repr(str(label)) in str(error)]
            rows = "; ".join(f"{label!r} first at {first_row[label]}" for label in named if label in first_row)
            if rows:
                raise InputError(f"{error} ({rows})") from None
        raise


def positive_index(names: list[str], positive_class: str | None, declared: Sequence[str] | None, where: str) -> tuple[int, str]:
    """Which of two class names is positive, and why (see the module documentation)."""
    if positive_class is not None:
        if positive_class not in names:
            raise InputError(f"{where}: --data.positive_class {positive_class!r} is not one of the classes {names}{did_you_mean(positive_class, names)}")
        return names.index(positive_class), "--data.positive_class"
    negative = [i for i, name in enumerate(names) if _key(name) in NEGATIVE_NAMES]
    if len(negative) == 1:
        return 1 - negative[0], f"{names[negative[0]]!r} means no finding"
    if declared is not None:
        return 1, "the second of --data.class_names"
    raise InputError(
        f"{where}: a binary task with classes {names}: which one is positive (the class prob_<name>, AUROC and F1 are about)? "
        f"Set --data.positive_class to one of them"
    )


def order_binary(labels: np.ndarray, names: list[str], positive_class: str | None, declared: Sequence[str] | None, where: str) -> tuple[np.ndarray, list[str], str]:
    """Put the positive class at index 1 (the model's one logit); returns labels, names, why."""
    index, why = positive_index(names, positive_class, declared, where)
    if index == 1:
        return labels, names, why
    return 1 - labels, [names[1], names[0]], why
