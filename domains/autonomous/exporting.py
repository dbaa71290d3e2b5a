"""The autonomous model's export: an :class:`~domains.autonomous.networks.InferenceSequenceModel` with the data's normalisation."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from domains.autonomous.covariate_export import covariate_inputs
from domains.autonomous.networks import InferenceSequenceModel
from pipelines.export import quantile_output
from pipelines.export_spec import ExportSpec
from pipelines.task import BaseTask


def export_spec(task: BaseTask, datamodule_state: dict[str, Any] | None) -> ExportSpec:
    """Raw ``past`` positions and ``channels`` -> forecast positions / value / class probabilities.

    Batch and time are dynamic for the recurrent families; PatchTST is built for ``observe`` steps,
    so its time axis is fixed. The metadata names the inputs' channels (``position_names``,
    ``channel_names``) and the data's sampling interval (``time_step``) for the server's request
    forms (``serving.py``); a checkpoint written before those two were recorded exports them as
    ``null``, and the server falls back as its docstring says. A quantile model exports its median
    (the point prediction) and, as a second output ``quantiles``, every level (``(N, Q)`` values or
    ``(N, Q, predict, D)`` positions, sorted: no crossing), described by ``quantile_output`` in the
    metadata (:func:`pipelines.export.quantile_output`); a classifier its calibrated probabilities.

    ``task`` is the :class:`~domains.autonomous.model.SensorSequenceModel` whose ``export_spec`` calls this.
    """
    if not datamodule_state or "displacement_scale" not in datamodule_state:
        raise ValueError("the checkpoint holds no SensorSequenceDataModule statistics; export a checkpoint written by `pipelines.run autonomous`")
    hp = task.hparams
    temperature = task.calibration.temperature if hp.task == "classification" else 1.0
    levels = list(task.quantile_levels or [])
    observe = int(datamodule_state.get("observe", hp.observe))
    channels = len(datamodule_state["channel_mean"])
    time_axis = {} if hp.architecture == "transformer" else {1: "time"}
    extra_names, extra_examples, extra_axes, covariates = covariate_inputs(datamodule_state, observe, int(hp.get("predict") or 0), time_axis)
    module: nn.Module = InferenceSequenceModel(
        copy.deepcopy(task.network), hp.task, task.stochastic, bool(hp.get("velocity_residual", False)), hp.target_dim, datamodule_state,
        point=slice(None) if levels else task.point_index, temperature=temperature, extra_inputs=tuple(extra_names),  # slice(None): every level, sorted
    ).eval()
    if levels:
        module = WithQuantiles(module, task.point_index).eval()
    past = torch.cumsum(torch.randn(2, observe, hp.target_dim), 1)
    output = {"forecasting": "positions", "regression": "value", "classification": "probabilities"}[hp.task]
    return ExportSpec(
        module=module,
        example_inputs=(past, torch.randn(2, observe, channels), *extra_examples),
        input_names=["past", "channels", *extra_names],
        output_names=[output, "quantiles"] if levels else [output],
        dynamic_axes={"past": {0: "batch", **time_axis}, "channels": {0: "batch", **time_axis}, **extra_axes, output: {0: "batch"},
                      **({"quantiles": {0: "batch"}} if levels else {})},
        unsupported_formats={"onnx": "PatchTST (--model.architecture transformer) does not export to ONNX: its positional encoding fails "
                                     "ONNX shape inference; use --format torchscript"} if hp.architecture == "transformer" else {},
        metadata={
            "task": hp.task,
            "architecture": hp.architecture,
            "target_names": datamodule_state.get("target_names"),
            "channel_names": datamodule_state.get("channel_names"),
            "position_names": datamodule_state.get("position_names"),
            "time_step": datamodule_state.get("time_step"),
            "position_step_scale": datamodule_state.get("position_step_scale"),  # a request in another length unit is refused (position_units.py)
            "class_names": datamodule_state.get("class_names"),
            "observe": observe,
            "predict": hp.get("predict"),
            "input": "past: target positions (N, T, D) and channels (N, T, C) in the data's units, oldest first, time_step apart",
            "output": f"{output} in the data's units (forecast: future positions (N, predict, D))",
            "quantiles": levels or None,
            "point_prediction": "the median of the quantile levels; every level is in the output 'quantiles'" if levels else None,
            "quantile_output": quantile_output(levels) if levels else None,
            "calibration": {"temperature": temperature, "method": "temperature scaling fitted on the validation split (inside the exported graph)"}
            if hp.task == "classification" else None,
            "normalisation": {k: datamodule_state[k] for k in ("displacement_scale", "channel_mean", "channel_std", "target_mean", "target_std")},
            **covariates,  # future-known and categorical channels, vocabularies, groups (covariate_export.py)
        },
    )


class WithQuantiles(nn.Module):
    """``(median, quantiles)`` from a module that returns every quantile level along dim 1: the point prediction stays the first output."""

    def __init__(self, quantiles: nn.Module, point: int) -> None:
        super().__init__()
        self.quantiles, self.point = quantiles, point

    def forward(self, past: torch.Tensor, channels: torch.Tensor, *covariates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.quantiles(past, channels, *covariates)
        return levels[:, self.point], levels
