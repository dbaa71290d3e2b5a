"""Fitted preprocessing of transaction tables: column roles -> model inputs, saved with the model.

A :class:`TablePreprocessor` is fitted once on the training rows and then applied, unchanged, to
validation, test and scoring rows (its :meth:`~TablePreprocessor.state_dict` holds only plain
Python values, so it travels in the Lightning checkpoint and loads with ``weights_only=True``).

Roles (each a list of column names, set in the config):

- ``id_columns``: dropped from the features (kept in the scored output).
- ``numeric_columns``: parsed as numbers, missing values imputed with the training median, scaled
  robustly (below).
- ``amount_columns``: as numeric, after ``sign(x) * log1p(|x|)`` (amounts are heavy-tailed).
- ``boolean_columns``: ``true/false/1/0/yes/no/t/f/y/n``; missing -> the training share of true.
- ``timestamp_columns``: hour of day and day of week, each as a point on a circle (sin, cos); whether the
  training values carry a time zone is kept (``timestamp_zones``) and values of the other kind are refused.
- ``categorical_columns``: a vocabulary of the most frequent training values plus an ``<unknown>``
  slot (index 0) for values unseen in training; one-hot features or indices for an embedding.
- ``label_column``: optional; two classes ``label_classes = [normal, fraud]``.
- ``ignore_columns``: columns the table has but the model must not use (kept in the scored output);
  every other column must have a role (see ``TransactionDataModule``).

Robust scaling (numeric and amount columns): ``(x - center) / scale`` with the mean and standard
deviation of the training values clipped at the median +- 10 robust standard deviations
(:func:`robust_scale`), so that one extreme training value cannot blow up the scale and silence the feature for every other
row, as a plain standard deviation would. Scaled values beyond ``+-CLIP_UNITS`` (50) are compressed
logarithmically, ``sign(z) * (50 + log1p(|z| - 50))`` (:func:`soft_clip`): monotone, so a larger
value still scores as more unusual, and at most ``50 + 89`` for any float32 value, so the network's
arithmetic stays finite and one extreme row cannot dominate a training batch (10 instead of 50
lost the heavy tails' information: synthetic AUPRC fell from 0.94 to 0.83). The
training range (``lows``/``highs``, min and max of the training values) is saved too: a scored
value outside it is reported in ``out_of_range`` (``transform``) and alerted by ``predict``.
Infinite values and magnitudes beyond float32 are refused (:mod:`domains.finance.parsing`).

Every feature belongs to a *group* named after its source column (``timestamp.hour``,
``timestamp.weekday`` for timestamps), so per-feature anomaly contributions are reported in the
analyst's terms. Every problem raises ``InputError`` (a ``ValueError``) naming the source, the column and the rows.

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

from domains.finance.parsing import (  # noqa: F401  (re-exported: serving and older code import them from here)
    FALSE_TOKENS,
    MISSING,
    MISSING_TOKENS,
    TRUE_TOKENS,
    RowPositions,
    TimestampZones,
    category_text,
    label_text,
    parse_boolean,
    parse_labels,
    parse_numeric,
    parse_timestamp,
)
from pipelines.errors import InputError

UNKNOWN = "<unknown>"
ROLE_FIELDS = ("id_columns", "numeric_columns", "amount_columns", "boolean_columns", "timestamp_columns", "categorical_columns")
#: scaled numeric inputs beyond +-CLIP_UNITS robust standard deviations are compressed logarithmically (see the module docstring)
CLIP_UNITS = 50.0


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
    ignore_columns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for role in (*ROLE_FIELDS, "ignore_columns"):
            for column in getattr(self, role):
                if column in seen:
                    raise InputError(f"column {column!r} is listed in both {seen[column]} and {role}; give each column one role")
                seen[column] = role
        if self.label_column is not None and self.label_column in seen:
            raise InputError(f"label_column {self.label_column!r} is also listed in {seen[self.label_column]}; give each column one role")
        if not any(getattr(self, role) for role in ROLE_FIELDS[1:]):
            raise InputError("no feature columns configured: set at least one of " + ", ".join(ROLE_FIELDS[1:]))

    def required(self) -> list[tuple[str, str]]:
        """``(column, role)`` for every configured column except the label."""
        return [(column, role) for role in ROLE_FIELDS for column in getattr(self, role)]


def soft_clip(z: np.ndarray, limit: float) -> np.ndarray:
    """``z`` within ``+-limit``; beyond, ``sign(z) * (limit + log1p(|z| - limit))`` (monotone, finite for finite ``z``).

    Example:
        >>> soft_clip(np.array([-3.0, 10.0, 11.0, 1e30]), 10.0).round(2).tolist()
        [-3.0, 10.0, 10.69, 79.08]
    """
    excess = np.maximum(np.abs(z) - limit, 0.0)
    return np.where(excess > 0, np.sign(z) * (limit + np.log1p(excess)), z)


#: robust_scale clips at the median +- FENCE_UNITS robust standard deviations (IQR / 1.349) before taking the spread
FENCE_UNITS = 10.0


def robust_scale(values: np.ndarray) -> tuple[float, float]:
    """``(center, scale)`` of finite values: the mean and standard deviation of the values clipped
    to *fences* at the median +- 10 ``IQR / 1.349``, so a few extreme training values cannot inflate
    the scale and silence the feature (two ``1e30`` in a column would make its standard deviation
    ``~1e28``), while the spread of the bulk is the usual standard deviation.

    When the IQR is 0 (more than half the rows share one value: indicators, mostly-zero amounts)
    the values are winsorised at their ``q`` / ``1 - q`` quantiles instead, ``q = max(0.1 %, 3 / n)``;
    when that spread is 0 too (an indicator that is 1 in fewer than 0.1 % of rows), the plain
    standard deviation; then 1. ``IQR / 1.349`` as the scale itself (tried first) gave such rare
    one-hot indicators scale 1 instead of ~0.1 and cost the ADBench campaign benchmark 10 AUROC points.

    Example:
        >>> center, scale = robust_scale(np.r_[np.random.default_rng(0).normal(5, 2, 10000), 1e30, 1e30])
        >>> round(center, 1), round(scale, 1)
        (5.0, 2.0)
        >>> round(robust_scale(np.r_[np.zeros(1999), 1.0])[1], 3)   # a rare indicator keeps its weight
        0.022
    """
    values = np.asarray(values, dtype=np.float64)
    median = float(np.median(values))
    tiny = 1e-9 * max(1.0, abs(median))
    q25, q75 = np.percentile(values, [25, 75])
    width = FENCE_UNITS * float(q75 - q25) / 1.349
    if width > tiny:
        clipped = np.clip(values, median - width, median + width)
    else:
        q = min(0.25, max(0.001, 3.0 / len(values)))
        clipped = np.clip(values, np.quantile(values, q, method="higher"), np.quantile(values, 1.0 - q, method="lower"))
    center, scale = float(clipped.mean()), float(clipped.std())
    if scale <= tiny:
        center, scale = float(values.mean()), float(values.std())
    return center, (scale if scale > tiny else 1.0)


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
    # fitted state (numeric and amount columns in transformed units: after log1p for amounts)
    medians: dict[str, float] = field(default_factory=dict)  # imputation
    centers: dict[str, float] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    lows: dict[str, float] = field(default_factory=dict)  # training range; empty in a legacy state
    highs: dict[str, float] = field(default_factory=dict)
    clip: float = CLIP_UNITS
    scaling: Literal["robust", "standard"] = "robust"  # "standard": a legacy state (mean / std), loaded as it was
    true_share: dict[str, float] = field(default_factory=dict)
    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    unknown_shares: dict[str, float] = field(default_factory=dict)  # training rows mapped to <unknown> (empty in a legacy state)
    timestamp_zones: dict[str, str] = field(default_factory=dict)  # per timestamp column: zoned or naive values (empty in a legacy state)
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
    def range_columns(self) -> list[str]:
        """The columns whose values are checked against the training range (``out_of_range``'s columns)."""
        return [*self.roles.numeric_columns, *self.roles.amount_columns]

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
                raise InputError(f"{source}: column {column!r} (configured in {role}) is missing; the file has columns {list(columns)}")

    def check_values(self, frame: pd.DataFrame, source: str, rows: RowPositions = 0, zones: TimestampZones | None = None) -> None:
        """Parse every configured column of ``frame`` (all rows), raising on the first bad value (``zones``: the timestamp
        kinds of the file's earlier chunks, :class:`domains.finance.parsing.TimestampZones`)."""
        r = self.roles
        self.check_columns(list(frame.columns), source)
        for column in [*r.numeric_columns, *r.amount_columns]:
            parse_numeric(frame[column], source, rows)
        for column in r.boolean_columns:
            parse_boolean(frame[column], source, rows)
        for column in r.timestamp_columns:
            parse_timestamp(frame[column], source, rows, zones)
        if r.label_column is not None and r.label_column in frame.columns:
            parse_labels(frame[r.label_column], self.label_classes, source, rows)

    # ----- fit / transform ------------------------------------------------------------------
    def fit(self, frame: pd.DataFrame, source: str, rows: RowPositions = 0) -> TablePreprocessor:
        """Fit imputation, scaling and vocabularies on the training rows ``frame`` (``rows``: their
        positions in the source file, for error messages)."""
        r = self.roles
        self.check_columns(list(frame.columns), source)
        self.notes: list[str] = []  # what fit did that a user should hear about (not part of the state)
        for column in [*r.numeric_columns, *r.amount_columns]:
            values = parse_numeric(frame[column], source, rows)
            if np.isnan(values).all():
                raise InputError(f"{source}: column {column!r} is empty (all {len(values)} training values are missing)")
            if column in r.amount_columns:
                values = np.sign(values) * np.log1p(np.abs(values))
            present = values[~np.isnan(values)]
            center, scale = robust_scale(present)
            self.medians[column], self.centers[column], self.scales[column] = float(np.median(present)), center, scale
            self.lows[column], self.highs[column] = float(present.min()), float(present.max())
            if present.min() == present.max():
                self.notes.append(
                    f"column {column!r} has one value ({frame[column].iloc[int(np.flatnonzero(~np.isnan(values))[0])]!r}) in all {len(present)} "
                    "non-missing training values: it carries no information (a different value when scoring is out of range and alerted); "
                    "remove it from the feature columns or list it in --data.ignore_columns if that is not meant"
                )
            compressed = int((np.abs(present - center) / scale > self.clip).sum())
            if compressed:
                self.notes.append(
                    f"column {column!r}: {compressed} of {len(present)} training values lie beyond {self.clip:g} robust standard deviations "
                    "(compressed logarithmically)"
                )
        for column in r.boolean_columns:
            values = parse_boolean(frame[column], source, rows)
            if np.isnan(values).all():
                raise InputError(f"{source}: column {column!r} is empty (all {len(values)} training values are missing)")
            self.true_share[column] = float(np.nanmean(values))
        zones = TimestampZones()
        for column in r.timestamp_columns:
            if parse_timestamp(frame[column], source, rows, zones).isna().all():
                raise InputError(f"{source}: column {column!r} is empty (all {len(frame)} training values are missing)")
        self.timestamp_zones = zones.kinds
        for column in r.categorical_columns:
            text = category_text(frame[column])
            if (text == MISSING).all():
                raise InputError(f"{source}: column {column!r} is empty (all {len(text)} training values are missing)")
            counts = pd.Series(text).value_counts(sort=True)
            if len(counts) < 2:
                raise InputError(
                    f"{source}: categorical column {column!r} has only one value ({counts.index[0]!r}) in the {len(text)} "
                    "training rows; it carries no information: remove it from categorical_columns"
                )
            kept = counts[counts >= self.min_category_count].index[: self.max_categories]
            self.vocabularies[column] = [UNKNOWN, *sorted(str(v) for v in kept)]
            self.unknown_shares[column] = float(1.0 - counts[kept].sum() / len(text))
        self.fitted = True
        return self

    def unseen_categories(self, frame: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per categorical column of ``frame``: each row's category text and whether the vocabulary lacks it (the row is
        then scored as ``<unknown>``, and the column carries no signal for it)."""
        found = {}
        for column in self.roles.categorical_columns:
            text = category_text(frame[column])
            found[column] = (text, ~np.isin(text, self.vocabularies.get(column, [])))
        return found

    def transform(self, frame: pd.DataFrame, source: str, row_offset: RowPositions = 0) -> dict[str, np.ndarray]:
        """Encode rows; ``row_offset`` is the file position of ``frame``'s first row (for error messages)."""
        if not self.fitted:
            raise RuntimeError("TablePreprocessor.transform called before fit (or load_state_dict)")
        r = self.roles
        self.check_columns(list(frame.columns), source)
        n = len(frame)
        parts: list[np.ndarray] = []
        out_of_range = np.zeros((n, len(self.range_columns)), dtype=bool)
        for j, column in enumerate(self.range_columns):
            values = parse_numeric(frame[column], source, row_offset)
            if column in r.amount_columns:
                values = np.sign(values) * np.log1p(np.abs(values))
            if column in self.lows:
                with np.errstate(invalid="ignore"):
                    out_of_range[:, j] = (values < self.lows[column]) | (values > self.highs[column])
            values = np.where(np.isnan(values), self.medians[column], values)
            scaled = (values - self.centers[column]) / self.scales[column]
            parts.append(soft_clip(scaled, self.clip)[:, None])
        for column in r.boolean_columns:
            values = parse_boolean(frame[column], source, row_offset)
            parts.append(np.where(np.isnan(values), self.true_share[column], values)[:, None])
        zones = TimestampZones(self.timestamp_zones)  # the training kind: the other is refused
        for column in r.timestamp_columns:
            parsed = parse_timestamp(frame[column], source, row_offset, zones)
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
        out = {"numeric": numeric, "categorical": categorical, "out_of_range": out_of_range}
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
        if "means" in state:  # a state saved before robust scaling: scored exactly as it was trained
            state["centers"], state["scales"], state["scaling"] = state.pop("means"), state.pop("stds"), "standard"
        return cls(roles=roles, **state)

