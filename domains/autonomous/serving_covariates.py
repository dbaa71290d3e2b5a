"""The covariates of a served autonomous request (``serving.py``): categorical channels, the group, future-known values.

A bundle trained with covariates (``domain_metadata``: ``categorical_channels`` and ``vocabularies``,
``group_column`` and ``group_names``, ``known_future_channels``) reads them from named observations:

- each categorical channel and the group column is a field of every observation, as in the training
  table (text, or a number used as a name); the model reads the categories of the last ``observe``
  observations and the group of the last one;
- the future-known channels' past is in the observations like any channel, and their future values
  in ``"future"`` (``"futures"``: one list per sequence of the ``sequences`` form), one object per
  forecast step, ``predict`` of them: ``{"future": [{"speed_limit": 13.9}, ...]}``.

A category or group not seen in training is not refused (the one rule, as in ``predict``): the
category is read as the unknown category, the group uses the global statistics, the answer says so
under ``"warnings"`` (with counts) and the server's log names the values and the closest known category.
Malformed values (a missing field, a list, ``true``, a wrong number of future steps) are 422s naming the field.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from domains.autonomous.categorical import category_text, describe_unknown, encode
from pipelines.serve import reject

logger = logging.getLogger("pipelines.serve")


class RequestCovariates:
    """What a bundle's ``domain_metadata`` says about covariates, and how a request's are read."""

    def __init__(self, domain: dict[str, Any], predict: int, number: Callable[[Any, str], float]) -> None:
        self.number = number  # a checked JSON number (serving.number)
        self.categorical: list[str] = list(domain.get("categorical_channels") or [])
        self.vocabularies: dict[str, list[str]] = dict(domain.get("vocabularies") or {})
        self.group_column: str | None = domain.get("group_column")
        self.group_names: list[str] = list(domain.get("group_names") or [])
        self.global_only = set((domain.get("group_normalisation") or {}).get("global_only") or [])  # seen, with too few windows of their own
        self.known: list[str] = list(domain.get("known_future_channels") or [])
        self.predict = int(predict or 0)
        self.text_fields: list[str] = list(dict.fromkeys([*self.categorical, *([self.group_column] if self.group_column else [])]))

    def future_key(self, key: str) -> str | None:
        """The request field of the future-known values for the form whose key is ``key``."""
        return ("future" if key == "observations" else "futures") if self.known else None

    def example(self, key: str) -> str:
        """What a request adds for the covariates (for the adapter's ``example``)."""
        texts = "".join(f'; "{f}": <text> in every observation' for f in self.text_fields)
        steps = ", ".join(f'"{k}": <number>' for k in self.known)
        return texts + (f'; "{self.future_key(key)}": [{{{steps}}}, ... {self.predict} forecast steps]' if self.known else "")

    def text(self, row: dict[str, Any], field: str, where: str) -> str:
        if field not in row:
            reject(f"{where}.{field}", f"missing channel; every observation needs {self.text_fields} (categories, as in training)")
        value = row[field]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value == "":
            reject(f"{where}.{field}", f"expected a category (text, or a number used as a name); got {value!r}"[:200])
        return category_text(value)

    def read(self, rows: list[Any], first: int, request: dict[str, Any], key: str, index: int | None, where: str) -> dict[str, np.ndarray]:
        """``codes`` ``(observe, n)``, ``group`` ``()``, ``known`` ``(predict, K)`` of one sequence (``rows``: its last
        ``observe`` observations, from index ``first``, already checked) and ``unknown_categories`` ``(n,)`` / ``unknown_group`` ``()``."""
        out: dict[str, np.ndarray] = {}
        if self.categorical:
            codes, unknown = [], []
            for column in self.categorical:
                values = np.array([self.text(row, column, f"{where}[{first + i}]") for i, row in enumerate(rows)], dtype=object)
                column_codes, missing = encode(values, self.vocabularies[column])
                codes.append(column_codes)
                unknown.append(sum(missing.values()))
                if missing:
                    logger.warning("%s: category not seen in training, read as unknown: %s", where, describe_unknown(column, missing, self.vocabularies[column]))
            out["codes"] = np.stack(codes, -1).astype(np.int64)
            out["unknown_categories"] = np.array(unknown, dtype=np.int64)
        if self.group_column:
            name = self.text(rows[-1], self.group_column, f"{where}[{first + len(rows) - 1}]")
            index_of = {g: i for i, g in enumerate(self.group_names)}
            out["group"] = np.array(index_of.get(name, len(self.group_names)), dtype=np.int64)
            unseen = name not in index_of and name not in self.global_only
            out["unknown_group"] = np.array(int(unseen), dtype=np.int64)
            if unseen:
                logger.warning("%s: group %r of %r not seen in training: the global statistics were used", where, name, self.group_column)
        if self.known:
            out["known"] = self.future(request, key, index)
        return out

    def future(self, request: dict[str, Any], key: str, index: int | None) -> np.ndarray:
        """The ``predict`` future steps of the future-known channels ``(predict, K)`` of sequence ``index`` (None: the only one)."""
        field = self.future_key(key)
        steps = request.get(field)
        where = field
        if index is not None:
            if not isinstance(steps, list) or len(steps) <= index:
                reject(field, f"expected one list of future steps per sequence (the {self.known} values of each forecast step); got {str(steps)[:80]}")
            steps, where = steps[index], f"{field}[{index}]"
        if not isinstance(steps, list) or len(steps) != self.predict:
            got = f"{len(steps)} step(s)" if isinstance(steps, list) else repr(steps)[:80]
            reject(where, f"expected the {self.predict} forecast steps' future-known values {self.known}, one object per step; got {got}")
        values = []
        for t, step in enumerate(steps):
            if not isinstance(step, dict):
                reject(f"{where}[{t}]", f"expected an object {{channel: number}} of {self.known}; got {type(step).__name__}")
            extra = sorted(str(k) for k in step if k not in self.known)
            if extra:
                reject(f"{where}[{t}].{extra[0]}", f"unknown field; future steps give the future-known channels {self.known}")
            missing = [k for k in self.known if k not in step]
            if missing:
                reject(f"{where}[{t}].{missing[0]}", f"missing channel; every future step needs {self.known}")
            values.append([self.number(step[k], f"{where}[{t}].{k}") for k in self.known])
        return np.array(values, dtype=np.float32)

    def warnings(self, outputs: dict[str, np.ndarray], i: int) -> list[str]:
        """The answer's ``warnings`` for sequence ``i``: unknown categories (counts) and an unseen group."""
        notes = []
        for j, column in enumerate(self.categorical):
            count = int(outputs["unknown_categories"][i][j]) if "unknown_categories" in outputs else 0
            if count:
                notes.append(f"{column}: {count} observation(s) with a category not seen in training, read as the unknown category")
        if "unknown_group" in outputs and int(outputs["unknown_group"][i]):
            notes.append(f"{self.group_column}: group not seen in training; the global normalisation statistics were used")
        return notes

    def annotate(self, answers: list[dict[str, Any]], outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Each answer with its ``warnings``, when it has any."""
        return [answer | ({"warnings": notes} if (notes := self.warnings(outputs, i)) else {}) for i, answer in enumerate(answers)]

