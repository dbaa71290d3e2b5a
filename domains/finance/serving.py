"""Finance request forms for ``python -m pipelines.serve finance`` (found by convention).

Transaction rows with the training table's columns, as a client has them::

    {"rows": [{"amount": 12.5, "timestamp": "2024-03-04 13:45:00", "merchant_category": "grocery", ...}, ...]}
        -> {"predictions": [{"score": 3.1, "is_alert": false, "out_of_range": [], "top_features": [{"feature": "amount", "contribution": 1.2}, ...]}, ...],
            "threshold": 9.8}    (a VAE's answers add "latent_contribution": the score's KL part, no one column's)
    {"row": {...}}  ->  {"score": 3.1, "is_alert": false, "out_of_range": [], "top_features": [...], "threshold": 9.8}

Rows are prepared with the checkpoint's fitted preprocessing, once per server batch: ``decode``
checks each request's structure (objects, columns, single values) without pandas, and ``infer``
prepares the rows of every request of the batch in one pass (the per-call cost of the pandas
preprocessing, several milliseconds, is paid once per batch, not per request); a request whose
values do not parse is then refused alone, naming its row and column, and the others are answered.
The preprocessing is read from the bundle's
``domain_metadata.preprocessing_state`` into the domain's own
:class:`~domains.finance.preprocessing.TablePreprocessor` (the code training and ``predict`` use,
so serving cannot drift from them). Every feature column must be present in every row; a ``null``
(or empty/NA text) value is a missing value, imputed as in training; a category value never seen
in training goes to the ``<unknown>`` slot. Id columns and the label column may be sent and are
ignored; any other column is refused. Errors are 422s naming the row and column, e.g.
``rows[2].amount: expected a number ...``. Imports numpy, pandas and ``pipelines.serve``.

A row is answered as ``predict`` scores it: a value ``predict`` refuses (inf, a magnitude beyond
float32's range such as ``1e300``) is refused here (422), and a numeric or amount value outside the
range seen in training is named in ``out_of_range`` and alerted (``is_alert`` true) whatever its
score, as in ``predict``'s file. A timestamp with a time zone sent to a model trained on timestamps without
one, or the reverse (the checkpoint keeps the kind), and a request mixing the two kinds, are 422s naming the
field (``rows[1].timestamp: expected a timestamp without a time zone ...``): the hour features would shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from fastapi import HTTPException

from domains.finance.parsing import ZONE_WORDS, label_text, zone_kinds
from domains.finance.preprocessing import TablePreprocessor, parse_boolean, parse_numeric, parse_timestamp
from pipelines.validation import FLOAT32_MAX
from pipelines.serve import ModelCall, RequestAdapter, reject, run_once

SOURCE = "request"


def _number(value: float) -> float | None:
    """A JSON-ready float (``None`` for NaN or infinity)."""
    value = float(value)
    return value if math.isfinite(value) else None


class TransactionRowsAdapter(RequestAdapter):
    """``{"rows": [{column: value, ...}, ...]}`` -> score, alert and top contributing columns per row."""

    name = "rows"
    key = "rows"
    example = '{"rows": [{"<column>": <value>, ...}, ...]}  (the training table\'s columns; ids and label optional)'

    def __init__(self, metadata: dict[str, Any]) -> None:
        super().__init__(metadata)
        domain = metadata.get("domain_metadata", {})
        if "preprocessing_state" not in domain:
            raise ValueError("this finance bundle has no domain_metadata.preprocessing_state; re-export the checkpoint")
        self.preprocessor = TablePreprocessor.from_state_dict(domain["preprocessing_state"])
        roles = self.preprocessor.roles
        self.role_of: dict[str, str] = {column: role for column, role in roles.required() if role != "id_columns"}
        self.columns: list[str] = list(self.role_of)
        self.ignored: set[str] = set(roles.id_columns) | set(roles.ignore_columns) | ({roles.label_column} if roles.label_column else set())
        self.label_column: str | None = roles.label_column
        self.label_classes: list[str] = [label_text(c) for c in self.preprocessor.label_classes]
        self.contribution_names: list[str] = list(domain.get("contribution_names", self.preprocessor.group_names))
        self.top_k: int = min(int(domain.get("top_features", 3)), len(self.contribution_names))
        threshold = domain.get("threshold")
        self.threshold: float | None = None if threshold is None else float(threshold)
        self.embedded = "categorical" in self.input_specs
        self.probability: dict[str, Any] | None = domain.get("probability")  # Platt scaling fitted on validation, or None
        self.variational = domain.get("architecture") == "vae"  # answers carry latent_contribution, as predict's column

    def accepts(self, request: dict[str, Any]) -> bool:
        return self.key in request

    def count_items(self, request: dict[str, Any]) -> int | None:
        """Rows in the request, read before any is parsed (``--max_items`` refuses large ones at once)."""
        rows = request.get(self.key)
        return len(rows) if isinstance(rows, list) else 1

    # ----- request -> model inputs ----------------------------------------------------------------
    def _rows(self, request: dict[str, Any]) -> tuple[list[Any], Callable[[int], str]]:
        """The request's rows and how to name row ``i`` in an error."""
        rows = request["rows"]
        if not isinstance(rows, list) or not rows:
            reject("rows", f"expected a non-empty list of objects (one per transaction); got {type(rows).__name__ if rows != [] else 'an empty list'}")
        return rows, self._where

    def decode(self, request: dict[str, Any]) -> dict[str, np.ndarray]:
        """The request's rows, their structure checked (values are parsed per batch, in :meth:`infer`)."""
        unexpected = sorted(set(request) - {self.key})
        if unexpected:
            reject(unexpected[0], f"unexpected field; the {self.name} form is {self.example}")
        rows, where = self._rows(request)
        self.check_rows(rows, where)
        objects = np.empty(len(rows), dtype=object)
        objects[:] = rows
        starts = np.zeros(len(rows), dtype=bool)
        starts[0] = True  # where this request's rows begin in the batch
        return {"row_objects": objects, "request_start": starts}

    def infer(self, inputs: dict[str, np.ndarray], run: ModelCall) -> dict[str, np.ndarray]:
        """Prepare the rows of every request of the batch in one pass and score them in one model call.

        When a value does not parse, each request is prepared alone: one that fails gets its refusal
        (``refusal``, read by :meth:`encode`) and the others are scored as usual."""
        rows = list(inputs["row_objects"])
        bounds = [*np.flatnonzero(inputs["request_start"]).tolist(), len(rows)]
        refusals = np.full(len(rows), None, dtype=object)
        frame = self.features(rows)
        try:
            encoded = self.preprocessor.transform(frame, SOURCE)
        except ValueError:  # one request's values: find it, and refuse it alone
            parts = []
            for start, end in zip(bounds[:-1], bounds[1:]):
                try:
                    parts.append(self.transform(self.frame(rows[start:end], self._where), self._where))
                except HTTPException as error:
                    refusals[start:end] = [(error.status_code, str(error.detail))] * (end - start)
            if not parts:
                return {"refusal": refusals}
            encoded = {key: np.concatenate([p[key] for p in parts]) for key in ("numeric", "categorical", "out_of_range")}
        good = np.array([r is None for r in refusals])
        model_inputs = {"numeric": encoded["numeric"], **({"categorical": encoded["categorical"]} if self.embedded else {})}
        scored = run_once(model_inputs, run, self.input_specs)
        outputs = {}
        for name, values in scored.items():  # refused rows get zeros, never read
            outputs[name] = np.zeros((len(rows), *np.shape(values)[1:]), dtype=np.asarray(values).dtype)
            outputs[name][good] = values
        outside = np.zeros((len(rows), encoded["out_of_range"].shape[1]), dtype=bool)  # request context, not a model input
        outside[good] = encoded["out_of_range"]
        logged = np.zeros((len(rows), *encoded["numeric"].shape[1:]), dtype=encoded["numeric"].dtype)  # the request log's features
        logged[good] = encoded["numeric"]
        return {**outputs, "out_of_range": outside, "unseen_category": self.unseen_categories(frame), "input.numeric": logged, "refusal": refusals}

    def unseen_categories(self, frame: pd.DataFrame) -> np.ndarray:
        """Per row and categorical column: a value the training never kept (scored as ``<unknown>``, so the column
        carries no signal for the row); named in the answer's ``unseen_categories``, as ``predict`` counts them per file."""
        masks = [unseen for _, unseen in self.preprocessor.unseen_categories(frame).values()]
        return np.stack(masks, 1) if masks else np.zeros((len(frame), 0), dtype=bool)

    def _where(self, i: int) -> str:
        return f"rows[{i}]"

    def check_rows(self, rows: list[Any], where: Callable[[int], str]) -> None:
        """Every row is an object with the feature columns (ids and label optional) holding single values."""
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                reject(where(i), f"expected an object {{column: value}}; got {type(row).__name__}")
            missing = [c for c in self.columns if c not in row]
            if missing:
                reject(f"{where(i)}.{missing[0]}", f"missing column ({self.role_of[missing[0]]}); every row needs the columns {self.columns}")
            unknown = sorted(str(c) for c in row if c not in self.role_of and c not in self.ignored)
            if unknown:
                reject(f"{where(i)}.{unknown[0]}", f"unknown column; expected the columns {self.columns} (ids and label optional)")
            for column in sorted(str(c) for c in row if c in self.ignored):  # ids and label: not scored, but not any value either
                value = row[column]
                if value is not None and not isinstance(value, (str, int, float)):
                    reject(f"{where(i)}.{column}", f"expected a single value (number, text or null) in this optional column; got {type(value).__name__}")
                if column == self.label_column and value is not None and label_text(value) not in self.label_classes:
                    reject(f"{where(i)}.{column}", f"expected a label of the training classes {self.label_classes} (normal, fraud) or null; got {value!r}")
            for column in self.columns:
                value = row[column]
                if value is not None and not isinstance(value, (str, int, float)):
                    reject(f"{where(i)}.{column}", f"expected a single value (number, text or null); got {type(value).__name__}")
                if isinstance(value, bool) and self.role_of[column] in ("numeric_columns", "amount_columns"):
                    reject(f"{where(i)}.{column}", f"expected a number ({self.role_of[column]}); got {str(value).lower()}")
                if isinstance(value, float) and not math.isfinite(value):  # as in training files: missing is null, never NaN
                    reject(f"{where(i)}.{column}", f"expected a finite number or null (missing); got {value}")

    def features(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        """The feature columns of checked rows as a frame (one row per transaction)."""
        data: dict[str, pd.Series] = {}
        for column, role in self.role_of.items():
            values = [row[column] for row in rows]
            if role == "categorical_columns":  # integral numbers read as in a float column ("3", not "3.0") whatever else is in the request
                values = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
            data[column] = pd.Series(values, name=column)
        for column in self.preprocessor.roles.id_columns:  # not features, but the preprocessing expects the columns
            data[column] = pd.Series([None] * len(rows), name=column, dtype=object)
        return pd.DataFrame(data)

    def frame(self, rows: list[Any], where: Callable[[int], str]) -> pd.DataFrame:
        """Check every row's columns and values (refusing the first bad one by row and column); the feature columns as a frame."""
        self.check_rows(rows, where)
        frame = self.features(rows)
        for column, role in self.role_of.items():
            self._check(frame[column], role, where)
        return frame

    @staticmethod
    def _parser(role: str) -> Callable[[pd.Series], Any] | None:
        parsers = {
            "numeric_columns": parse_numeric, "amount_columns": parse_numeric,
            "boolean_columns": parse_boolean, "timestamp_columns": parse_timestamp,
        }  # fmt: skip
        parse = parsers.get(role)
        return None if parse is None else (lambda series: parse(series, SOURCE))

    def _check(self, series: pd.Series, role: str, where: Callable[[int], str]) -> None:
        """Parse a column as training does; on failure, refuse naming the first bad row."""
        parse = self._parser(role)
        if parse is None:
            return
        if role == "timestamp_columns":
            self._check_zones(series, where)
        try:
            parse(series)
            return
        except ValueError:
            pass
        wanted = {
            "numeric_columns": "a number", "amount_columns": "a number (an amount)",
            "boolean_columns": "a boolean (true/false, 1/0, yes/no)", "timestamp_columns": "a timestamp (e.g. 2024-05-01 13:45:00)",
        }[role]  # fmt: skip
        for i, value in enumerate(series.tolist()):
            try:
                parse(pd.Series([value], name=series.name))
            except ValueError:
                shown = f"an integer of {len(str(abs(value)))} digits" if isinstance(value, int) and abs(value) > 10**20 else repr(value)
                huge = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > FLOAT32_MAX
                if huge and role in ("numeric_columns", "amount_columns"):
                    reject(f"{where(i)}.{series.name}", f"expected a finite number within float32's range (|x| <= {FLOAT32_MAX:.2g}) or null (missing), as predict does ({role}); got {shown}")
                reject(f"{where(i)}.{series.name}", f"expected {wanted} ({role}); got {shown}")
        # every value parses alone (e.g. timestamps written in different formats): transform() goes row by row

    def _check_zones(self, series: pd.Series, where: Callable[[int], str]) -> None:
        """Every timestamp of the kind the model was trained on (with or without a time zone; without a kind in the
        checkpoint, the kind of the request's first one), else a 422 naming the field."""
        masks = zone_kinds(series)
        kinds = [next((kind for kind, mask in masks.items() if mask[i]), None) for i in range(len(series))]
        present = [i for i, kind in enumerate(kinds) if kind is not None]
        trained = self.preprocessor.timestamp_zones.get(str(series.name))
        expected = trained or (kinds[present[0]] if present else None)
        for i in present:
            if kinds[i] != expected:
                reference = "the model was trained on" if trained else f"{where(present[0])}.{series.name} is"
                reject(f"{where(i)}.{series.name}", f"expected a timestamp {ZONE_WORDS[expected]}, as {reference}: the hour and weekday "
                       f"features would be shifted in silence (timestamp_columns); got {series.iloc[i]!r}")  # fmt: skip

    def transform(self, frame: pd.DataFrame, where: Callable[[int], str]) -> dict[str, np.ndarray]:
        """The training preprocessing of ``frame``, row by row when the rows only parse one at a time."""
        try:
            return self.preprocessor.transform(frame, SOURCE)
        except ValueError:
            pass
        parts = []
        for i in range(len(frame)):
            try:
                parts.append(self.preprocessor.transform(frame.iloc[[i]].reset_index(drop=True), SOURCE))
            except ValueError as error:
                reject(where(i), str(error).removeprefix(f"{SOURCE}: "))
        return {key: np.concatenate([p[key] for p in parts]) for key in ("numeric", "categorical", "out_of_range")}

    # ----- model outputs -> answer ----------------------------------------------------------------
    def predictions(self, outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """One ``{"score", "is_alert", "out_of_range", "top_features", "unseen_categories"}`` per row, as ``predict``
        writes them: a row with a value outside the training range is alerted and names those columns; a category the
        training never kept is named (not alerted: ``predict`` warns per file)."""
        answers = []
        ranged = self.preprocessor.range_columns
        outside_rows = outputs.get("out_of_range", np.zeros((len(outputs["score"]), 0), dtype=bool))
        unseen_rows = outputs.get("unseen_category", np.zeros((len(outputs["score"]), 0), dtype=bool))
        categorical = self.preprocessor.roles.categorical_columns
        for score, alert, contributions, outside, unseen in zip(outputs["score"], outputs["is_alert"], outputs["contributions"], outside_rows, unseen_rows):
            order = np.argsort(-contributions, kind="stable")[: self.top_k]
            top = [{"feature": self.contribution_names[j], "contribution": _number(contributions[j])} for j in order]
            columns = [ranged[j] for j in np.flatnonzero(outside)]
            answer = {"score": _number(score), "is_alert": bool(alert) or bool(columns), "out_of_range": columns, "top_features": top,
                      "unseen_categories": [categorical[j] for j in np.flatnonzero(unseen)]}  # fmt: skip
            if self.variational:  # the VAE score's KL part: the score minus its per-column contributions
                answer["latent_contribution"] = _number(max(float(score) - float(np.sum(contributions, dtype=np.float64)), 0.0))
            if self.probability:  # as predict's fraud_probability: sigmoid(slope * score + intercept) in float64
                z = self.probability["slope"] * float(score) + self.probability["intercept"]
                answer["fraud_probability"] = _number(1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z)))
            answers.append(answer)
        return answers

    @staticmethod
    def refuse_if_refused(outputs: dict[str, np.ndarray]) -> None:
        """Refuse this request if :meth:`infer` found a value of it that does not parse."""
        refusal = outputs.get("refusal")
        if refusal is not None and refusal[0] is not None:
            status_code, detail = refusal[0]
            raise HTTPException(status_code=status_code, detail=detail)

    def encode(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        self.refuse_if_refused(outputs)
        return {"predictions": self.predictions(outputs), "threshold": self.threshold}


class TransactionRowAdapter(TransactionRowsAdapter):
    """``{"row": {column: value, ...}}`` -> one row's score, alert and top contributing columns."""

    name = "row"
    key = "row"
    example = '{"row": {"<column>": <value>, ...}}  (the training table\'s columns; ids and label optional)'

    def _rows(self, request: dict[str, Any]) -> tuple[list[Any], Callable[[int], str]]:
        return [request["row"]], self._where

    def _where(self, i: int) -> str:
        return "row"

    def encode(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        self.refuse_if_refused(outputs)
        return {**self.predictions(outputs)[0], "threshold": self.threshold}


ADAPTERS = [TransactionRowsAdapter, TransactionRowAdapter]
