"""What a ``TransactionDataModule`` saves in every checkpoint and how it takes a checkpoint's back.

:func:`data_state` is the data module's ``state_dict``: the fitted :class:`~domains.finance.preprocessing.TablePreprocessor`,
the split rule and the drift reference (:func:`training_reference_of`). :func:`restore_data_state` is its
``load_state_dict``: the checkpoint's preprocessing and drift reference, and its split rule when the command gave
the default one (``pipelines.splits.adopt``); a checkpoint whose columns do not match data already read is refused.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from domains.finance.preprocessing import TablePreprocessor
from domains.finance.streaming import training_reference
from pipelines.errors import InputError
from pipelines.reference import KEY as REFERENCE_KEY
from pipelines.splits import SplitRule, adopt

#: the split rule of the default options (a checkpoint's rule is used when a command gives this one)
DEFAULT_SPLIT = SplitRule(val_fraction=0.15, test_fraction=0.25)
#: what the data module caches from its source (dropped when a checkpoint's split rule replaces the command's)
READ_FROM_THE_SOURCE = ("split_assignment", "stream")


def data_state(dm: Any) -> dict[str, Any]:
    """The preprocessing in force, the split rule and the drift reference of the training split."""
    return {"preprocessor": dm.fitted.state_dict(), "split_rule": dm.split_rule.as_dict(), REFERENCE_KEY: training_reference_of(dm)}


def training_reference_of(dm: Any) -> dict[str, Any]:
    """Drift reference (:mod:`pipelines.reference`) of the training split's preprocessed numeric features, the bundle's
    ``numeric`` input (what the server logs); PSI and KS are unchanged by the monotone scaling. The checkpoint's when restored."""
    if getattr(dm, "_reference", None) is None:
        train = dm._split("train")
        dm._reference = training_reference(train, dm.fitted.numeric_feature_names, f"{dm.source_name} training split ({len(train)} rows)")
    return dm._reference


def restore_data_state(dm: Any, state_dict: dict[str, Any]) -> None:
    """The checkpoint's preprocessing, its drift reference, and its split rule when this command gave none (``pipelines.splits.adopt``)."""
    dm._reference = state_dict.get(REFERENCE_KEY)  # absent in checkpoints written before it existed: fitted again on demand
    rule = adopt(dm.split_rule, state_dict.get("split_rule"), DEFAULT_SPLIT)
    if rule != dm.split_rule:
        rank_zero_info(f"[finance] the checkpoint's split: {rule.describe()}")
        dm.split_rule = rule
        for cached in READ_FROM_THE_SOURCE:
            dm.__dict__.pop(cached, None)
        dm._encoded.clear()
        dm.preprocessor = None
    restored = TablePreprocessor.from_state_dict(state_dict["preprocessor"])
    current = dm.preprocessor  # None when restored before anything was read (the runner, --ckpt_path)
    if current is not None and (restored.group_names != current.group_names or len(restored.numeric_feature_names) != len(current.numeric_feature_names)):
        raise InputError(
            f"the checkpoint's preprocessing (columns {restored.group_names}, {len(restored.numeric_feature_names)} features) "
            f"does not match this data's ({current.group_names}, {len(current.numeric_feature_names)} features); "
            "use the column roles and source the model was trained with"
        )
    dm.preprocessor = restored
