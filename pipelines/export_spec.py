"""What a domain hands the exporter: a plain module with its pre- and post-processing inside.

Kept free of Lightning so that :class:`pipelines.task.BaseTask` and the exporter share it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ExportSpec:
    """A self-contained inference module and how to call it.

    Args:
        module: a plain ``nn.Module`` mapping raw inputs (as a client has them, e.g. images scaled to
            [0, 1]) to final outputs (e.g. class probabilities): normalisation and post-processing
            are inside it, so the exported graph needs no project code.
        example_inputs: inputs of a valid shape, used to trace and to check parity.
        input_names: one name per input.
        output_names: one name per output.
        dynamic_axes: per input/output name, the axes that vary (``{0: "batch"}`` at least).
        metadata: JSON-serialisable facts a client needs (class names, image size, thresholds,
            feature names, de-normalisation) written to the bundle's ``metadata.json``.
        unsupported_formats: ``{format: why}`` for formats this model cannot be exported to; such an
            export is refused (exit 2) with the reason, before anything is written.
        input_ranges: ``{input name: (low, high, what the values are)}`` for inputs whose values have a
            fixed range (e.g. image intensities in [0, 1]): the bundle refuses values outside it
            (``Bundle.validate``; the server answers 422), since a model scores them without a word.
    """

    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    metadata: dict[str, Any] = field(default_factory=dict)
    unsupported_formats: dict[str, str] = field(default_factory=dict)
    input_ranges: dict[str, tuple[float, float, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.example_inputs) != len(self.input_names):
            raise ValueError(f"{len(self.example_inputs)} example inputs for input_names {self.input_names}")
        missing = [name for name in (*self.input_names, *self.output_names) if 0 not in self.dynamic_axes.get(name, {})]
        if missing:
            raise ValueError(f"dynamic_axes must make axis 0 (batch) dynamic for every input and output; missing for {missing}")
        unknown = sorted(set(self.input_ranges) - set(self.input_names))
        if unknown or any(not low < high for low, high, _ in self.input_ranges.values()):
            raise ValueError(f"input_ranges must name inputs ({self.input_names}) with low < high; got {self.input_ranges}")
