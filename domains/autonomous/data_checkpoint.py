"""What a ``SensorSequenceDataModule`` saves in every checkpoint and how it takes a checkpoint's back.

:func:`data_state` is the data module's ``state_dict``: the statistics fitted on the training split
(:mod:`domains.autonomous.fitted_state`) and the split rule. :func:`restore_data_state` is its
``load_state_dict``: the checkpoint's split rule when the command gave the default one (the tables are then
cut again by it), the checks that the checkpoint's classes, predicted channels, time step and covariates
agree with this data, then the checkpoint's statistics in place of fitting any.
"""

from __future__ import annotations

from typing import Any

from pipelines.splits import SplitRule, adopt
from domains.autonomous.covariates import check_checkpoint_covariates
from domains.autonomous.fitted_state import check_checkpoint_state
from domains.autonomous.readers import log

#: the split rule of the default options (a checkpoint's rule is used when a command gives this one)
DEFAULT_SPLIT = SplitRule()
#: what the data module caches from its source (dropped when a checkpoint's split rule replaces the command's)
READ_FROM_THE_SOURCE = ("tables", "tracks", "class_names", "windows", "streamed")


def data_state(dm: Any) -> dict[str, Any]:
    """The statistics fitted on the training split (fitted now if not yet) and the split rule."""
    if dm.stats is None:
        dm.stats = dm.fit_statistics()
    return {**dm.stats, "split_rule": dm.split_rule.as_dict()}


def restore_data_state(dm: Any, state_dict: dict[str, Any]) -> None:
    """Use a checkpoint's statistics; the class list and target names must match this data's.

    A checkpoint's ``time_step`` must equal this data's (the step its val, test and predict
    files were checked against). Checkpoints written before ``position_names`` and ``time_step`` were recorded still load:
    those two are taken from this data's configuration (``target_channels`` and the training
    split's time step), so that checkpoints written after a resume, and their exports, have them.
    """
    rule = adopt(dm.split_rule, state_dict.get("split_rule"), DEFAULT_SPLIT)
    if rule != dm.split_rule:  # the checkpoint's split: the tables are cut again by it
        log(f"the checkpoint's split: {rule.describe()}")
        dm.split_rule = rule
        for cached in READ_FROM_THE_SOURCE:
            dm.__dict__.pop(cached, None)
        dm.datasets = {}
    read = "tracks" in dm.__dict__  # the data was read (Lightning's restore after setup): it must agree
    hp = dm.hparams
    data_step = hp.time_step if hp.time_step is not None else (dm.tracks["train"].report["time_step"] if read else None)
    check_checkpoint_state(state_dict, dm.class_names if dm.task == "classification" and read else None, dm.target_names, data_step)
    check_checkpoint_covariates(state_dict, hp)
    dm.stats = {k: v for k, v in state_dict.items() if k != "split_rule"}
    dm.stats.setdefault("position_names", dm.position_names)
    if "time_step" not in dm.stats:  # (reads the training split only for such old checkpoints)
        dm.stats["time_step"] = dm.time_step
