"""Run an exported bundle with onnxruntime (or TorchScript) alone.

This file is copied into every bundle as ``runtime.py``: it imports only the standard library,
numpy and onnxruntime (``torch`` only for TorchScript bundles), never Lightning, MONAI or this
project, so a bundle runs wherever those two packages install.

Example::

    from runtime import Bundle            # inside the bundle folder
    bundle = Bundle("path/to/bundle")
    outputs = bundle.run(image=images)    # dict of numpy arrays, named as in metadata.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

BUNDLE_FORMAT = 1  # bump on incompatible changes to metadata.json or the model's inputs/outputs


class Bundle:
    """A loaded bundle: ``metadata`` (dict) and ``run(**inputs) -> {output name: array}``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        metadata_file = self.path / "metadata.json"
        if not metadata_file.is_file():
            raise ValueError(f"{self.path}: not a bundle (no metadata.json)")
        self.metadata: dict[str, Any] = json.loads(metadata_file.read_text())
        found = self.metadata.get("bundle_format")
        if found != BUNDLE_FORMAT:
            raise ValueError(
                f"{self.path}: bundle format {found!r} is not supported by this runtime (format {BUNDLE_FORMAT}); "
                "re-export the checkpoint with this version of domain-pipelines"
            )
        self.inputs = {spec["name"]: spec for spec in self.metadata["inputs"]}
        self.output_names = [spec["name"] for spec in self.metadata["outputs"]]
        model_file = self.path / self.metadata["model_file"]
        if self.metadata["format"] == "onnx":
            import onnxruntime

            self._session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
            self._module = None
        elif self.metadata["format"] == "torchscript":
            import torch

            self._module = torch.jit.load(str(model_file), map_location="cpu").eval()
        else:
            raise ValueError(f"{self.path}: unknown model format {self.metadata['format']!r}")

    def validate(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Check names, rank, fixed sizes and dtype; return contiguous arrays of the declared dtype."""
        unknown, missing = set(inputs) - set(self.inputs), set(self.inputs) - set(inputs)
        if unknown or missing:
            raise ValueError(f"inputs must be exactly {sorted(self.inputs)}; missing {sorted(missing)}, unexpected {sorted(unknown)}")
        arrays = {}
        for name, spec in self.inputs.items():
            try:
                array = np.ascontiguousarray(np.asarray(inputs[name], dtype=spec["dtype"]))
            except (TypeError, ValueError) as error:
                raise ValueError(f"input {name!r}: cannot convert to {spec['dtype']}: {error}") from None
            shape = spec["shape"]
            if array.ndim != len(shape):
                raise ValueError(f"input {name!r}: expected {len(shape)} dimensions {shape}, got shape {list(array.shape)}")
            for axis, (want, got) in enumerate(zip(shape, array.shape)):
                if isinstance(want, int) and want != got:
                    raise ValueError(f"input {name!r}: axis {axis} must be {want}, got shape {list(array.shape)} (expected {shape})")
            if array.shape[0] == 0:
                raise ValueError(f"input {name!r}: empty batch")
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise ValueError(f"input {name!r}: contains NaN or infinite values")
            arrays[name] = array
        return arrays

    def run(self, **inputs: Any) -> dict[str, np.ndarray]:
        arrays = self.validate(inputs)
        if self._module is None:
            outputs = self._session.run(self.output_names, arrays)
        else:
            import torch

            with torch.no_grad():
                result = self._module(*(torch.from_numpy(arrays[name]) for name in self.inputs))
            result = result if isinstance(result, (tuple, list)) else (result,)
            outputs = [r.numpy() for r in result]
        return dict(zip(self.output_names, outputs))
