"""The state a ``SensorSequenceDataModule`` fits on the training split and saves in every checkpoint.

:func:`fit_input_statistics` fits how model inputs are scaled (per-channel z-scores, one isotropic
displacement scale, the regression target's mean and spread); :func:`check_checkpoint_state`
refuses a checkpoint whose classes, predicted channels or time step differ from this data's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipelines.errors import InputError
from pipelines.reference import KEY as REFERENCE_KEY, fit_sequence_reference
from pipelines.validation import check_labels
from domains.autonomous.covariates import fit_covariate_state
from domains.autonomous.position_units import KEY as STEP_SCALE_KEY, fit_step_scale
from domains.autonomous.readers import FILE, Tracks, origin, where
from domains.autonomous.sampling import EPS
from domains.autonomous.streamed_state import fit_streamed_statistics, streamed_reference
from domains.autonomous.windows import Windows


def fit_input_statistics(tracks: Tracks, windows: Windows, observe: int, target_dim: int, regression: bool) -> dict[str, Any]:
    """Scaling statistics of the training split's windows: ``channel_mean``/``channel_std`` of the observed
    rows, ``displacement_scale`` (the RMS step length of the position channels within segments), and for
    ``regression`` the ``target_mean``/``target_std`` of the label at each window's last observed row (else 0 and 1)."""
    rows = np.unique(windows.rows[:, :observe])
    channels = tracks.channels[rows]
    same = np.zeros(len(tracks.time) - 1, bool)
    for start, length in zip(tracks.starts, tracks.lengths):
        same[start : start + length - 1] = True
    steps = np.diff(tracks.targets, axis=0)[same] if target_dim else np.zeros((0, 0))
    scale = float(np.sqrt((steps**2).sum(1).mean())) if steps.size else 1.0
    stats: dict[str, Any] = {
        # summed in float64, kept at float32 precision: what bounded passes over a mapped split (domains.autonomous.streamed_state) give too
        "channel_mean": channels.mean(0, dtype=np.float64).astype(np.float32).astype(float).tolist(),
        "channel_std": np.maximum(channels.std(0, dtype=np.float64).astype(np.float32), 1e-6).astype(float).tolist(),
        "displacement_scale": max(scale, 1e-6),
        "target_mean": 0.0,
        "target_std": 1.0,
    }
    if regression:
        labels = tracks.label[windows.rows[:, observe - 1]].astype(float)
        stats["target_mean"], stats["target_std"] = float(labels.mean()), float(max(labels.std(), 1e-6))
    return stats


def fit_data_statistics(dm: Any) -> dict[str, Any]:
    """Everything a ``SensorSequenceDataModule`` (``dm``) fits on its training split and saves in the checkpoint: the input
    scaling, the classes, how inputs are built (for exported models), the drift reference and the covariates' state; with
    ``--data.streaming true`` from bounded passes over the mapped split (:mod:`domains.autonomous.streamed_state`)."""
    train, windows, sequences = dm.tracks["train"], dm.windows["train"], {"past": dm.position_names, "channels": list(dm.columns.channels)}
    regression = dm.task == "regression"
    if dm.hparams.streaming:
        fitted = fit_streamed_statistics(train, windows, dm.observe, dm.target_dim, regression, dm.streamed.maps)
        reference = streamed_reference(train, windows, dm._tensors, sequences, "training split", dm.streamed.maps)
    else:  # drift reference per sequence channel of the training windows (pipelines.reference)
        fitted = fit_input_statistics(train, windows, dm.observe, dm.target_dim, regression)
        reference = fit_sequence_reference(dm._tensors(train, windows, "train"), sequences, "training split")
    return {
        **fitted,
        "class_names": dm.class_names,
        "target_names": dm.target_names,
        # how inputs are built, for exported models (see export_spec in model.py)
        "channel_names": list(dm.columns.channels),  # channels, then the future-known channels (their past)
        "position_names": dm.position_names,
        "time_step": dm.time_step,
        STEP_SCALE_KEY: fit_step_scale(train),  # how far the moving training tracks move per step (position_units.py)
        "canonical_heading": bool(dm.hparams.canonical_heading),
        "observe": dm.observe,
        REFERENCE_KEY: reference,
        **fit_covariate_state(train, windows, dm.observe, dm.hparams, regression),
    }


def check_checkpoint_state(state_dict: dict[str, Any], class_names: list[str] | None, target_names: list[str], data_step: float | None) -> None:
    """Refuse a checkpoint trained on other classes (``class_names``: this data's, None when not read or
    not classification), other predicted channels, or another time step (``data_step``: None when not known yet)."""
    if class_names is not None and state_dict.get("class_names") != class_names:
        raise InputError(
            f"the checkpoint was trained on classes {state_dict.get('class_names')} but the data has {class_names}; "
            "pass --data.class_names to use the checkpoint's class order"
        )
    if state_dict.get("target_names") != target_names:
        raise InputError(f"the checkpoint predicts {state_dict.get('target_names')} but the data is configured for {target_names}")
    saved = state_dict.get("time_step")
    if saved is not None and data_step is not None and abs(float(saved) - float(data_step)) > EPS * float(saved):
        raise InputError(
            f"the checkpoint was trained on data sampled every {float(saved):g} (its time step) but this data's time step is {float(data_step):g} "
            f"(--data.time_step, or the median step of the training tracks): its displacements would be misread; use data at the checkpoint's rate"
        )


def fit_class_names(tables: dict[str, pd.DataFrame], train: Tracks, column: str, given: list[str] | None) -> list[str]:
    """The class list: ``given`` (``--data.class_names``), else the sorted labels of the training split; labels that look like
    one class spelt two ways, or a class with too few rows, are refused (:func:`pipelines.validation.check_labels`)."""
    labels = pd.concat([table[column] for table in tables.values()]).dropna().astype(str)
    files = ", ".join(sorted({str(f) for table in tables.values() for f in table[FILE].unique()})[:3])
    check_labels(labels.value_counts().to_dict(), f"{files}, column {column!r}", given, first_row=lambda label: first_row_of(tables, column, label))
    if given:
        return list(given)
    names = sorted({str(v) for v in train.label if not pd.isna(v)})
    if len(names) < 2:
        raise InputError(f"{files}: target column {column!r} has {len(names)} class(es) in the training split; need at least 2")
    refuse_classes_unseen_in_training(tables, column, names)
    return names


def first_row_of(tables: dict[str, pd.DataFrame], column: str, label: str) -> str:
    """``file row N`` of the first row of the file (over every split) whose ``column`` holds ``label`` (as text)."""
    found = [origin(t, int(i[0])) for t in tables.values() if len(i := np.flatnonzero(t[column].astype(str).to_numpy() == str(label)))]
    return "{} row {}".format(*min(found)) if found else "no row"


def refuse_classes_unseen_in_training(tables: dict[str, pd.DataFrame], column: str, names: list[str]) -> None:
    """Refuse a validation or test label the training split does not have (``names``: the classes learnt from it),
    naming the file and first row: the model has no output for it, so its windows could not be scored."""
    for split, table in tables.items():
        if split == "train":
            continue
        labels = table[column].astype(object)
        unseen = labels.notna().to_numpy() & ~labels.astype(str).isin(names).to_numpy()
        if unseen.any():
            first = int(np.flatnonzero(unseen)[0])
            classes = sorted({str(v) for v in labels[unseen]})
            raise InputError(
                f"{where(table, first)}: target column {column!r} has class(es) {classes[:5]} in split {split!r} that the "
                f"training split does not have (the classes were learnt from it: {names}); give every class with "
                f"--data.class_names, or split so that the training split has them (--data.split_by, --data.split_column, "
                f"--data.split_seed)"
            )
