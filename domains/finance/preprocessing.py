"""Fitted preprocessing of transaction tables: column roles -> model inputs, saved with the model.

A :class:`TablePreprocessor` is fitted once on the training rows and then applied, unchanged, to
validation, test and scoring rows (its :meth:`~TablePreprocessor.state_dict` holds only plain
Python values, so it travels in the Lightning checkpoint and loads with ``weights_only=True``).

Roles (each a list of column names, set in the config):

- ``id_columns``: dropped from the features (kept in the scored output).
- ``numeric_columns``: parsed as numbers, missing values imputed with the training median, standardised.
- ``amount_columns``: as numeric, after ``sign(x) * log1p(|x|)`` (amounts are heavy-tailed).
- ``boolean_columns``: ``true/false/1/0/yes/no/t/f/y/n``; missing -> the training share of true.
- ``timestamp_columns``: hour of day and day of week, each as a point on a circle (sin, cos).
- ``categorical_columns``: a vocabulary of the most frequent training values plus an ``<unknown>``
  slot (index 0) for values unseen in training; one-hot features or indices for an embedding.
- ``label_column``: optional; two classes ``label_classes = [normal, fraud]``.

Every feature belongs to a *group* named after its source column (``timestamp.hour``,
``timestamp.weekday`` for timestamps), so per-feature anomaly contributions are reported in the
analyst's terms. Every problem raises ``ValueError`` naming the source, the column and the rows.

Example:
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"amount": ["1.5", "20", "3"], "shop": ["a", "b", "a"]})
    >>> pre = TablePreprocessor(ColumnRoles(amount_columns=["amount"], categorical_columns=["shop"])).fit(frame, "t.csv")
    >>> pre.group_names, pre.numeric_feature_names
    (['amount', 'shop'], ['amount', 'shop=<unknown>', 'shop=a', 'shop=b'])
    >>> pre.transform(pd.DataFrame({"amount": ["2"], "shop": ["zzz"]}), "new.csv")["numeric"][0, 1:].tolist()
    [1.0, 0.0, 0.0]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

UNKNOWN = "<unknown>"
MISSING = "<missing>"
MISSING_TOKENS = frozenset({"", "nan", "NaN", "NAN", "NA", "N/A", "null", "NULL", "None", "none", "NaT"})
TRUE_TOKENS = frozenset({"true", "1", "1.0", "yes", "y", "t"})
FALSE_TOKENS = frozenset({"false", "0", "0.0", "no", "n", "f"})
ROLE_FIELDS = ("id_columns", "numeric_columns", "amount_columns", "boolean_columns", "timestamp_columns", "categorical_columns")


@dataclass
class ColumnRoles:
    """Which column plays which role (see the module docstring)."""

    id_columns: list[str] = field(default_factory=list)
    numeric_columns: list[str] = field(default_factory=list)
    amount_columns: list[str] = field(default_factory=list)
    boolean_columns: list[str] = field(default_factory=list)
    timestamp_columns: list[str] = field(default_factory=list)
    categorical_columns: list[str] = field(default_factory=list)
    label_column: str | None = None

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for role in ROLE_FIELDS:
            for column in getattr(self, role):
                if column in seen:
                    raise ValueError(f"column {column!r} is listed in both {seen[column]} and {role}; give each column one role")
                seen[column] = role
        if self.label_column is not None and self.label_column in seen:
            raise ValueError(f"label_column {self.label_column!r} is also listed in {seen[self.label_column]}")
        if not any(getattr(self, role) for role in ROLE_FIELDS[1:]):
            raise ValueError("no feature columns configured: set at least one of " + ", ".join(ROLE_FIELDS[1:]))

    def required(self) -> list[tuple[str, str]]:
        """``(column, role)`` for every configured column except the label."""
        return [(column, role) for role in ROLE_FIELDS for column in getattr(self, role)]


RowPositions = int | np.ndarray
"""Where a frame's rows sit in its file: the offset of its first row, or every row's 0-based position."""


def _rows(mask: np.ndarray, row_offset: RowPositions, limit: int = 5) -> str:
    """1-based data-row numbers (the header is not counted) of the first offending rows."""
    positions = np.flatnonzero(mask)[:limit]
    rows = row_offset[positions] if isinstance(row_offset, np.ndarray) else positions + row_offset
    return ", ".join(str(int(p) + 1) for p in rows)


def _is_missing(series: pd.Series) -> np.ndarray:
    missing = np.array(series.isna().to_numpy(), dtype=bool)  # a writable copy (pandas copy-on-write)
    if series.dtype == object or pd.api.types.is_string_dtype(series.dtype):
        missing |= series.astype(str).str.strip().isin(MISSING_TOKENS).to_numpy()
    return missing


def parse_numeric(series: pd.Series, source: str, row_offset: RowPositions = 0) -> np.ndarray:
    """Finite numbers as float64 (missing -> NaN); anything else (text, infinity) is an error naming the rows."""
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.astype(float).to_numpy()
    if pd.api.types.is_numeric_dtype(series.dtype):
        values = series.to_numpy(dtype=float, na_value=np.nan)
        bad = np.isinf(values)
    else:
        missing = _is_missing(series)
        values = pd.to_numeric(series.where(~missing), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        bad = (np.isnan(values) & ~missing) | np.isinf(values)
    if bad.any():
        example = series.iloc[int(np.flatnonzero(bad)[0])]
        raise ValueError(
            f"{source}: column {series.name!r} should be numeric but has {int(bad.sum())} non-numeric value(s), "
            f"first at data row(s) {_rows(bad, row_offset)} (e.g. {example!r})"
        )
    return values


def parse_boolean(series: pd.Series, source: str, row_offset: RowPositions = 0) -> np.ndarray:
    """0/1 as float64 (missing -> NaN)."""
    if pd.api.types.is_bool_dtype(series.dtype) or pd.api.types.is_numeric_dtype(series.dtype):
        values = series.to_numpy(dtype=float, na_value=np.nan)
        bad = ~np.isnan(values) & ~np.isin(values, (0.0, 1.0))
    else:
        missing = _is_missing(series)
        text = series.astype(str).str.strip().str.lower()
        values = np.where(text.isin(TRUE_TOKENS), 1.0, np.where(text.isin(FALSE_TOKENS), 0.0, np.nan))
        values[missing] = np.nan
        bad = np.isnan(values) & ~missing
    if bad.any():
        example = series.iloc[int(np.flatnonzero(bad)[0])]
        raise ValueError(
            f"{source}: column {series.name!r} should be boolean (true/false, 1/0, yes/no) but has {int(bad.sum())} other "
            f"value(s), first at data row(s) {_rows(bad, row_offset)} (e.g. {example!r})"
        )
    return values


def parse_timestamp(series: pd.Series, source: str, row_offset: RowPositions = 0) -> pd.Series:
    """Datetimes in UTC (naive values are taken as they are); unparseable text is an error."""
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        parsed = series.dt.tz_localize("UTC") if series.dt.tz is None else series.dt.tz_convert("UTC")
        return parsed
    missing = _is_missing(series)
    parsed = pd.to_datetime(series.where(~missing), errors="coerce", utc=True)
    bad = parsed.isna().to_numpy() & ~missing
    if bad.any():
        example = series.iloc[int(np.flatnonzero(bad)[0])]
        raise ValueError(
            f"{source}: column {series.name!r} should hold timestamps (e.g. 2024-05-01 13:45:00) but has {int(bad.sum())} "
            f"unparseable value(s), first at data row(s) {_rows(bad, row_offset)} (e.g. {example!r})"
        )
    return parsed


def category_text(series: pd.Series) -> np.ndarray:
    """Category values as strings (missing -> ``<missing>``, integral floats without ``.0``)."""
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.to_numpy()
        text = np.array([MISSING if np.isnan(v) else (str(int(v)) if float(v).is_integer() else str(v)) for v in values], dtype=object)
        return text
    missing = _is_missing(series)
    text = np.array(series.astype(str).str.strip().to_numpy(dtype=object), dtype=object)
    text[missing] = MISSING
    return text


def label_text(value: Any) -> str:
    """Normalise one label value for comparison with ``label_classes`` (``1``, ``1.0``, ``"1"`` and ``True`` agree)."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def parse_labels(series: pd.Series, classes: list[Any], source: str, row_offset: RowPositions = 0) -> np.ndarray:
    """0 (normal) / 1 (fraud) as float32; values outside the two classes are an error naming the rows."""
    if len(classes) != 2 or label_text(classes[0]) == label_text(classes[1]):
        raise ValueError(f"label_classes must be two different values [normal, fraud], got {classes!r}")
    normal, fraud = (label_text(c) for c in classes)
    text = np.array([label_text(v) if not pd.isna(v) else "<missing>" for v in series.to_numpy(dtype=object)], dtype=object)
    labels = np.where(text == fraud, 1.0, 0.0).astype(np.float32)
    bad = (text != fraud) & (text != normal)
    if bad.any():
        found = sorted(set(text[bad].tolist()))[:5]
        raise ValueError(
            f"{source}: label column {series.name!r} must hold only the two classes {normal!r} (normal) and {fraud!r} (fraud) "
            f"(set label_classes); found {int(bad.sum())} other value(s) {found}, first at data row(s) {_rows(bad, row_offset)}"
        )
    return labels


@dataclass
class TablePreprocessor:
    """Column roles -> ``numeric`` (float32, N x F) and ``categorical`` (int64, N x C) arrays.

    Args:
        roles: the column roles.
        categorical_encoding: ``onehot`` (categoricals become 0/1 numeric features) or ``embedding``
            (categoricals stay indices, for an embedding layer and a softmax reconstruction).
        max_categories: vocabulary size per categorical column (most frequent training values; the rest
            share the ``<unknown>`` slot).
        min_category_count: training values seen fewer times than this go to ``<unknown>``.
        label_classes: ``[normal, fraud]`` values of the label column.
    """

    roles: ColumnRoles
    categorical_encoding: Literal["onehot", "embedding"] = "onehot"
    max_categories: int = 50
    min_category_count: int = 1
    label_classes: list[Any] = field(default_factory=lambda: [0, 1])
    # fitted state
    medians: dict[str, float] = field(default_factory=dict)
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    true_share: dict[str, float] = field(default_factory=dict)
    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    fitted: bool = False

    # ----- layout -------------------------------------------------------------------------
    @property
    def numeric_feature_names(self) -> list[str]:
        r = self.roles
        names = [*r.numeric_columns, *r.amount_columns, *r.boolean_columns]
        for column in r.timestamp_columns:
            names += [f"{column}.hour_sin", f"{column}.hour_cos", f"{column}.weekday_sin", f"{column}.weekday_cos"]
        if self.categorical_encoding == "onehot":
            for column in r.categorical_columns:
                names += [f"{column}={value}" for value in self.vocabularies.get(column, [UNKNOWN])]
        return names

    @property
    def group_names(self) -> list[str]:
        """Names of the contribution groups: one per source column (two per timestamp column)."""
        r = self.roles
        names = [*r.numeric_columns, *r.amount_columns, *r.boolean_columns]
        for column in r.timestamp_columns:
            names += [f"{column}.hour", f"{column}.weekday"]
        return names + list(r.categorical_columns)

    @property
    def numeric_feature_groups(self) -> list[int]:
        """Group index of every numeric feature."""
        r = self.roles
        groups = list(range(len(r.numeric_columns) + len(r.amount_columns) + len(r.boolean_columns)))
        base = len(groups)
        for i, _ in enumerate(r.timestamp_columns):
            groups += [base + 2 * i, base + 2 * i, base + 2 * i + 1, base + 2 * i + 1]
        base += 2 * len(r.timestamp_columns)
        if self.categorical_encoding == "onehot":
            for i, column in enumerate(r.categorical_columns):
                groups += [base + i] * len(self.vocabularies.get(column, [UNKNOWN]))
        return groups

    @property
    def categorical_feature_groups(self) -> list[int]:
        """Group index of every embedded categorical column (empty for one-hot)."""
        if self.categorical_encoding == "onehot":
            return []
        base = len(self.group_names) - len(self.roles.categorical_columns)
        return [base + i for i in range(len(self.roles.categorical_columns))]

    @property
    def categorical_cardinalities(self) -> list[int]:
        """Vocabulary size (with ``<unknown>``) of every embedded categorical column."""
        if self.categorical_encoding == "onehot":
            return []
        return [len(self.vocabularies[c]) for c in self.roles.categorical_columns]

    # ----- checks ---------------------------------------------------------------------------
    def check_columns(self, columns: list[str], source: str) -> None:
        """Every configured column must be present."""
        present = set(columns)
        for column, role in self.roles.required():
            if column not in present:
                raise ValueError(f"{source}: column {column!r} (configured in {role}) is missing; the file has columns {list(columns)}")

    def check_values(self, frame: pd.DataFrame, source: str, rows: RowPositions = 0) -> None:
        """Parse every configured column of ``frame`` (all rows), raising on the first bad value."""
        r = self.roles
        self.check_columns(list(frame.columns), source)
        for column in [*r.numeric_columns, *r.amount_columns]:
            parse_numeric(frame[column], source, rows)
        for column in r.boolean_columns:
            parse_boolean(frame[column], source, rows)
        for column in r.timestamp_columns:
            parse_timestamp(frame[column], source, rows)
        if r.label_column is not None and r.label_column in frame.columns:
            parse_labels(frame[r.label_column], self.label_classes, source, rows)

    # ----- fit / transform ------------------------------------------------------------------
    def fit(self, frame: pd.DataFrame, source: str, rows: RowPositions = 0) -> TablePreprocessor:
        """Fit imputation, scaling and vocabularies on the training rows ``frame`` (``rows``: their
        positions in the source file, for error messages)."""
        r = self.roles
        self.check_columns(list(frame.columns), source)
        for column in [*r.numeric_columns, *r.amount_columns]:
            values = parse_numeric(frame[column], source, rows)
            if np.isnan(values).all():
                raise ValueError(f"{source}: column {column!r} is empty (all {len(values)} training values are missing)")
            if column in r.amount_columns:
                values = np.sign(values) * np.log1p(np.abs(values))
            median = float(np.nanmedian(values))
            filled = np.where(np.isnan(values), median, values)
            self.medians[column], self.means[column] = median, float(filled.mean())
            self.stds[column] = float(filled.std()) if filled.std() > 1e-12 else 1.0
        for column in r.boolean_columns:
            values = parse_boolean(frame[column], source, rows)
            if np.isnan(values).all():
                raise ValueError(f"{source}: column {column!r} is empty (all {len(values)} training values are missing)")
            self.true_share[column] = float(np.nanmean(values))
        for column in r.timestamp_columns:
            if parse_timestamp(frame[column], source, rows).isna().all():
                raise ValueError(f"{source}: column {column!r} is empty (all {len(frame)} training values are missing)")
        for column in r.categorical_columns:
            text = category_text(frame[column])
            if (text == MISSING).all():
                raise ValueError(f"{source}: column {column!r} is empty (all {len(text)} training values are missing)")
            counts = pd.Series(text).value_counts(sort=True)
            if len(counts) < 2:
                raise ValueError(
                    f"{source}: categorical column {column!r} has only one value ({counts.index[0]!r}) in the {len(text)} "
                    "training rows; it carries no information: remove it from categorical_columns"
                )
            kept = counts[counts >= self.min_category_count].index[: self.max_categories]
            self.vocabularies[column] = [UNKNOWN, *sorted(str(v) for v in kept)]
        self.fitted = True
        return self

    def transform(self, frame: pd.DataFrame, source: str, row_offset: RowPositions = 0) -> dict[str, np.ndarray]:
        """Encode rows; ``row_offset`` is the file position of ``frame``'s first row (for error messages)."""
        if not self.fitted:
            raise RuntimeError("TablePreprocessor.transform called before fit (or load_state_dict)")
        r = self.roles
        self.check_columns(list(frame.columns), source)
        n = len(frame)
        parts: list[np.ndarray] = []
        for column in [*r.numeric_columns, *r.amount_columns]:
            values = parse_numeric(frame[column], source, row_offset)
            if column in r.amount_columns:
                values = np.sign(values) * np.log1p(np.abs(values))
            values = np.where(np.isnan(values), self.medians[column], values)
            parts.append(((values - self.means[column]) / self.stds[column])[:, None])
        for column in r.boolean_columns:
            values = parse_boolean(frame[column], source, row_offset)
            parts.append(np.where(np.isnan(values), self.true_share[column], values)[:, None])
        for column in r.timestamp_columns:
            parsed = parse_timestamp(frame[column], source, row_offset)
            hour = (parsed.dt.hour + parsed.dt.minute / 60.0).to_numpy(dtype=float, na_value=np.nan) * (2 * np.pi / 24)
            weekday = parsed.dt.dayofweek.to_numpy(dtype=float, na_value=np.nan) * (2 * np.pi / 7)
            block = np.stack([np.sin(hour), np.cos(hour), np.sin(weekday), np.cos(weekday)], 1)
            parts.append(np.nan_to_num(block, nan=0.0))  # a missing time sits at the circle's centre
        codes = []
        for column in r.categorical_columns:
            vocabulary = self.vocabularies[column]
            lookup = {value: i for i, value in enumerate(vocabulary)}
            index = np.fromiter((lookup.get(v, 0) for v in category_text(frame[column])), dtype=np.int64, count=n)
            if self.categorical_encoding == "onehot":
                parts.append(np.eye(len(vocabulary), dtype=np.float64)[index])
            else:
                codes.append(index)
        numeric = np.concatenate(parts, 1).astype(np.float32) if parts else np.zeros((n, 0), np.float32)
        categorical = np.stack(codes, 1) if codes else np.zeros((n, 0), np.int64)
        out = {"numeric": numeric, "categorical": categorical}
        if r.label_column is not None and r.label_column in frame.columns:
            out["label"] = parse_labels(frame[r.label_column], self.label_classes, source, row_offset)
        else:
            out["label"] = np.full(n, -1.0, np.float32)
        return out

    # ----- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (safe for ``torch.load(weights_only=True)``)."""
        state = asdict(self)
        state["label_classes"] = [label_text(c) for c in self.label_classes]
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TablePreprocessor:
        state = dict(state)
        roles = ColumnRoles(**state.pop("roles"))
        return cls(roles=roles, **state)
