"""The data options' values, checked when the data module is built: before anything is read or written.

Every refusal is an :class:`pipelines.errors.InputError` naming the option and what was expected
(the runner prints it and exits 2); the covariate options' rules are :func:`domains.autonomous.covariates.check_covariate_options`.
"""

from __future__ import annotations

from typing import Any

from pipelines.errors import InputError
from domains.autonomous.covariates import check_covariate_options
from domains.autonomous.sampling import check_time_options


def check_data_options(hp: Any) -> None:
    """``hp``: the data module's hyper-parameters."""
    if hp.path and hp.eth_ucy_root:
        raise InputError("give either --data.path or --data.eth_ucy_root, not both")
    if hp.task not in ("forecasting", "regression", "classification"):
        raise InputError(f"--data.task must be forecasting, regression or classification, got {hp.task!r}")
    for option, value, least, what in (
        ("observe", hp.observe, 2, "rows observed per window"),
        ("predict", hp.predict if hp.task == "forecasting" else 1, 1, "future rows forecast per window"),
        ("stride", hp.stride, 1, "rows between window starts"),
        ("batch_size", hp.batch_size, 1, "windows per batch"),
    ):
        if value < least:
            raise InputError(f"--data.{option} must be at least {least} ({what}), got {value}")
    if hp.task == "forecasting" and not hp.target_channels:
        raise InputError("--data.task forecasting needs --data.target_channels (the columns to forecast)")
    names = [str(name) for name in hp.class_names or []]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InputError(
            f"--data.class_names lists class {', '.join(map(repr, twice))} twice ({names}): each class is one model output, "
            "so a class listed twice gets an output that is never the target; list every class once"
        )
    alike: dict[str, list[str]] = {}
    for name in names:
        alike.setdefault(" ".join(name.split()).casefold(), []).append(name)
    near = [spellings for spellings in alike.values() if len(spellings) > 1]
    if near:
        raise InputError(
            f"--data.class_names lists {' and '.join(map(repr, near[0]))}, which differ only in case or spaces ({names}): the labels "
            "are matched exactly, so one of them would be an output that is never the target (or a typo of the other); "
            "list each class once, spelt as in the target column"
        )
    if hp.task != "forecasting" and not hp.target_column:
        raise InputError(f"--data.task {hp.task} needs --data.target_column (the column to predict)")
    if (hp.augment_rotation or hp.canonical_heading) and len(hp.target_channels or []) != 2:
        raise InputError(f"--data.augment_rotation and --data.canonical_heading need exactly 2 --data.target_channels (x, y), got {hp.target_channels}")
    check_time_options(hp.time_step, hp.time_jitter, hp.max_gap)
    check_covariate_options(hp)
