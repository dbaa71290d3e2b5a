"""The finance model's export: a :class:`~domains.finance.networks.FraudScorer` with its fitted preprocessing as JSON."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from domains.finance.networks import FraudScorer
from domains.finance.preprocessing import UNKNOWN, TablePreprocessor
from pipelines.export_spec import ExportSpec
from pipelines.task import BaseTask


def export_spec(task: BaseTask, datamodule_state: dict[str, Any] | None) -> ExportSpec:
    """Preprocessed rows -> ``score``, ``is_alert`` (the calibrated threshold) and per-column ``contributions``.

    The bundle's model takes the preprocessed feature matrix (and the categorical indices when
    categoricals are embedded); the fitted preprocessing travels in ``metadata.json`` as plain
    JSON (``preprocessing_state``) so that a client, or ``domains/finance/serving.py``, prepares
    raw transaction rows exactly as training did.

    ``task`` is the :class:`~domains.finance.model.FraudAutoencoder` whose ``export_spec`` calls this
    (its network, column groups and thresholds; typed by its base so this module does not import the model).
    """
    if not datamodule_state or "preprocessor" not in datamodule_state:
        raise ValueError(
            "the checkpoint holds no TransactionDataModule state (the fitted preprocessing); export a checkpoint written by `pipelines.run finance`"
        )
    preprocessor = TablePreprocessor.from_state_dict(datamodule_state["preprocessor"])
    hp = task.hparams
    if preprocessor.group_names != task.group_names or len(preprocessor.numeric_feature_names) != hp.num_numeric:
        raise ValueError(
            f"the checkpoint's preprocessing (groups {preprocessor.group_names}, {len(preprocessor.numeric_feature_names)} features) "
            f"does not match its model (groups {task.group_names}, {hp.num_numeric} features)"
        )
    threshold = float(task.threshold)
    if not math.isfinite(threshold):
        raise ValueError("the checkpoint has no calibrated threshold (no validation ran): its bundle would alert on nothing; export a checkpoint written by fit")
    module = FraudScorer(copy.deepcopy(task.network).cpu().eval(), task.numeric_groups.cpu(), task.categorical_groups.cpu(), threshold).eval()
    example: tuple[torch.Tensor, ...] = (torch.rand(2, hp.num_numeric),)
    names = ["numeric"]
    if task.network.cardinalities:
        example += (torch.zeros(2, len(task.network.cardinalities), dtype=torch.long),)
        names.append("categorical")
    outputs = ["score", "is_alert", "contributions"]
    budget = float(task.budget_threshold)
    roles = preprocessor.roles
    return ExportSpec(
        module=module,
        example_inputs=example,
        input_names=names,
        output_names=outputs,
        dynamic_axes={name: {0: "batch"} for name in (*names, *outputs)},
        metadata={
            "architecture": hp.architecture,
            "feature_names": preprocessor.numeric_feature_names,
            "categorical_feature_names": list(roles.categorical_columns) if task.network.cardinalities else [],
            "contribution_names": task.group_names,
            "threshold": threshold if math.isfinite(threshold) else None,
            "budget_threshold": budget if math.isfinite(budget) else None,
            "threshold_method": hp.threshold_method,
            "operating_point": {"threshold_target": hp.threshold_target, "cost_fn": hp.cost_fn, "cost_fp": hp.cost_fp}
            if hp.threshold_method in ("cost", "sensitivity", "specificity") else None,
            "probability": task.probability.describe(),
            "target_alert_rate": hp.target_alert_rate,
            "top_features": hp.top_features,
            "columns": [column for column, _ in roles.required() if column not in roles.id_columns],
            "id_columns": list(roles.id_columns),
            "label_column": roles.label_column,
            "unknown_category": UNKNOWN,
            "unknown_index": 0,
            "preprocessing_state": preprocessor.state_dict(),
            "preprocessing": PREPROCESSING_DESCRIPTION,
            "input": "numeric: float32 (N, len(feature_names)), the preprocessed features in feature_names order"
            + ("; categorical: int64 (N, len(categorical_feature_names)), vocabulary indices (0 = <unknown>)" if task.network.cardinalities else ""),
            "output": "score: float32 (N) anomaly score (negative log-likelihood, + KL for the VAE, at the posterior mean); "
            "is_alert: int64 (N) 1 when score >= threshold (compared in float64); contributions: float32 (N, len(contribution_names)) "
            "the score's reconstruction part split per source column",
        },
    )


#: how ``preprocessing_state`` (a :class:`~domains.finance.preprocessing.TablePreprocessor` state) turns a raw row into model inputs
PREPROCESSING_DESCRIPTION = (
    "Features in feature_names order, float32. Missing values: null, '' or NA/N/A/null/None/nan/NaT. "
    "numeric_columns: value, missing -> medians[column], then (x - centers[column]) / scales[column] (robust: median and IQR/1.349), "
    "then z beyond +-clip becomes sign(z) * (clip + log1p(|z| - clip)); a value outside [lows[column], highs[column]] (the training range) is out of range (predict alerts it). "
    "amount_columns: sign(x) * log1p(|x|) first, then as numeric (medians/centers/scales/lows/highs are of the transformed value). "
    "boolean_columns: true/1/yes/y/t -> 1, false/0/no/n/f -> 0, missing -> true_share[column]. "
    "timestamp_columns (parsed to UTC; naive times taken as they are; timestamp_zones[column] is 'zoned' or 'naive', the training "
    "times' kind, and a time of the other kind is refused): h = hour + minute/60, d = day of week (Monday 0); "
    "features sin(2 pi h/24), cos(2 pi h/24), sin(2 pi d/7), cos(2 pi d/7); a missing time gives 0 for all four. "
    "categorical_columns: text of the value (stripped; integral numbers without '.0'; missing -> '<missing>'); its index in "
    "vocabularies[column], index 0 ('<unknown>') for a value not in the vocabulary; categorical_encoding 'onehot': one 0/1 "
    "feature per vocabulary entry (column=value), 'embedding': the index goes to the categorical input. "
    "Column order: numeric_columns, amount_columns, boolean_columns, timestamp_columns (4 each), one-hot categoricals. "
    "id_columns and label_column are not features."
)
