"""Run an exported bundle with onnxruntime (or TorchScript) alone.

This file is copied into every bundle as ``runtime.py``: it imports only the standard library,
numpy and onnxruntime (``torch`` only for TorchScript bundles), never Lightning, MONAI or this
project, so a bundle runs wherever those two packages install.

Example::

    from runtime import Bundle            # inside the bundle folder
    bundle = Bundle("path/to/bundle")
    outputs = bundle.run(image=images)    # dict of numpy arrays, named as in metadata.json
    bundle.intervals(outputs)             # quantile bundles: {"80%": {"lower": .., "median": .., "upper": ..}}
    images = bundle.generate(count=4, seed=0, steps=50)   # diffusion bundles: the whole DDIM loop, (4, C, H, W) in [0, 1]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

BUNDLE_FORMAT = 1  # bump on incompatible changes to metadata.json or the model's inputs/outputs


def range_problem(array: np.ndarray, spec: dict[str, Any]) -> str | None:
    """What is wrong with values outside an input's declared range (``range`` in the bundle's input spec),
    or ``None``: a model scores them without a word (0-255 pixels for a [0, 1] image input give a
    confident class). Bundles exported before ranges were recorded have none and are not checked.

    Example:
        >>> spec = {"range": [0.0, 1.0], "range_means": "intensities by bit depth: 8-bit pixels / 255"}
        >>> range_problem(np.array([0.5, 200.0, 180.0]), spec)
        'values must lie in [0, 1] (intensities by bit depth: 8-bit pixels / 255); found 0.5 to 200 (2 of 3 values outside)'
    """
    if "range" not in spec or array.size == 0:
        return None
    low, high = spec["range"]
    found_low, found_high = float(array.min()), float(array.max())
    if low <= found_low and found_high <= high:
        return None
    outside = int(((array < low) | (array > high)).sum())
    means = spec.get("range_means", "the range the model was trained on")
    return f"values must lie in [{low:g}, {high:g}] ({means}); found {found_low:g} to {found_high:g} ({outside} of {array.size} values outside)"


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
            problem = range_problem(array, spec)
            if problem:
                raise ValueError(f"input {name!r}: {problem}")
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

    def quantiles(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A quantile bundle's levels from ``run``'s outputs, named by level: :func:`quantiles_of`."""
        return quantiles_of(self.metadata, outputs)

    def intervals(self, outputs: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """A quantile bundle's central intervals from ``run``'s outputs, named by level: :func:`intervals_of`."""
        return intervals_of(self.metadata, outputs)

    def generate(
        self, count: int = 1, seed: int = 0, steps: int | None = None, labels: Any = None, noise: np.ndarray | None = None,
        guidance_scale: float | None = None,
    ) -> np.ndarray:
        """Images ``(count, C, H, W)`` in [0, 1] from a diffusion bundle: the whole DDIM loop (eta 0), numpy only.

        The bundle's model is one denoising step; the schedule is ``domain_metadata.scheduler``.

        Args:
            count: number of images (ignored when ``noise`` is given).
            seed: image ``i`` starts from ``np.random.Generator(np.random.PCG64(seed + i)).standard_normal(shape,
                dtype=np.float32)``, as the server's ``{"seed": .., "count": ..}`` form.
            steps: DDIM steps, ``1 .. num_train_timesteps`` (default: the bundle's ``sampling_steps``).
            labels: class indices ``(count,)`` (or one index) for a class-conditional bundle; default
                ``(seed + i) % num_classes``, as the server.
            noise: the starting noise ``(N, C, H, W)`` instead of the seeded one.
            guidance_scale: classifier-free guidance scale (bundles of models trained with a null class,
                ``scheduler.guidance`` in the metadata; default its ``guidance_scale``; 1: none).
        """
        schedule = self.metadata.get("domain_metadata", {}).get("scheduler")
        if schedule is None or not {"noisy", "timestep"} <= set(self.inputs):
            raise ValueError(f"{self.path}: not a diffusion bundle (no domain_metadata.scheduler, or inputs {sorted(self.inputs)})")
        if noise is None:
            shape = tuple(self.inputs["noisy"]["shape"][1:])
            noise = np.stack([np.random.Generator(np.random.PCG64(seed + i)).standard_normal(shape, dtype=np.float32) for i in range(count)])
        noise = np.asarray(noise, dtype=np.float32)
        if "labels" in self.inputs:
            classes = int(self.metadata["domain_metadata"].get("num_classes", 0))
            default = (seed + np.arange(len(noise))) % max(classes, 1)
            labels = np.broadcast_to(np.asarray(default if labels is None else labels, dtype=np.int64), (len(noise),))
        elif labels is not None:
            raise ValueError(f"{self.path}: this model is not class-conditional; leave labels out")
        steps = int(schedule["sampling_steps"]) if steps is None else int(steps)
        sample = ddim_sample(lambda x: self.run(**x)["noise"], noise, ddim_schedule(schedule, steps), labels, guidance_scale)
        return (sample + 1.0) / 2.0


def quantiles_of(metadata: dict[str, Any], outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A quantile bundle's levels, named by level: ``{"q10": .., "q50": .., "q90": ..}``, each the output
    without its level axis (``domain_metadata.quantile_output`` of ``metadata`` says which output and axis)."""
    layout = metadata.get("domain_metadata", {}).get("quantile_output")
    if not layout:
        raise ValueError("not a quantile bundle (no domain_metadata.quantile_output): only models trained with quantile levels give intervals")
    values = np.asarray(outputs[layout["output"]])
    return {name: np.take(values, i, axis=layout["axis"]) for i, name in enumerate(layout["names"])}


def intervals_of(metadata: dict[str, Any], outputs: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """A quantile bundle's central intervals, named by level: ``{"80%": {"lower": q10, "median": q50, "upper": q90}, ...}``
    (widest first; ``{}`` when no two levels are symmetric about 0.5)."""
    named = quantiles_of(metadata, outputs)
    layout = metadata["domain_metadata"]["quantile_output"]
    return {i["name"]: {"lower": named[i["lower"]], "median": named[layout["median"]], "upper": named[i["upper"]]} for i in layout["intervals"]}


def ddim_schedule(schedule: dict[str, Any], steps: int) -> dict[str, Any]:
    """A bundle's DDIM schedule set to ``steps`` steps, as MONAI's ``DDIMScheduler.set_timesteps(steps)`` (``steps_offset`` 0).

    MONAI's timesteps are ``torch.linspace(T - 1, 0, steps).round()`` in float32. Torch's linspace
    takes a float32 step, fills the first half from the start and the second half from the end, and
    rounds each value once to float32; that is reproduced here, so every timestep is the same integer.
    """
    total = int(schedule["num_train_timesteps"])
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be in 1..{total}, got {steps}")
    start = np.float32(total - 1)
    delta = np.float64(-start / np.float32(max(steps - 1, 1)))
    index = np.arange(steps)
    values = np.where(index < steps // 2, np.float64(start) + index * delta, -(steps - 1 - index) * delta).astype(np.float32)
    timesteps = [total - 1] if steps == 1 else np.rint(values).astype(int).tolist()
    return {**schedule, "sampling_steps": steps, "timesteps": timesteps, "step_stride": total // steps}


#: largest classifier-free guidance scale any command or request takes: far above it, samples saturate to black and white
MAX_GUIDANCE = 20.0


def guidance_of(schedule: dict[str, Any], guidance_scale: float | None = None) -> tuple[float, int | None]:
    """``(scale, null_label)`` of classifier-free guidance for a bundle's ``schedule`` (``scheduler.guidance``):
    ``guidance_scale`` or the bundle's default; refused (``ValueError``) unless in 0..MAX_GUIDANCE, and unless
    the model has a null class when it is not 1."""
    guidance = schedule.get("guidance") or {}
    scale = float(guidance.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
    if not np.isfinite(scale) or not 0 <= scale <= MAX_GUIDANCE:
        raise ValueError(f"guidance_scale must be a number in 0..{MAX_GUIDANCE:g} (1: no guidance), got {guidance_scale}")
    if scale != 1.0 and "null_label" not in guidance:
        raise ValueError(f"guidance_scale {scale}: this model was trained without a null class (cond_drop_prob 0); only 1 (no guidance) applies")
    return scale, guidance.get("null_label")


def guided(step: Callable[[dict[str, np.ndarray]], np.ndarray], scale: float, null_label: int | None) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """Classifier-free guidance around a one-step denoiser: ``uncond + scale * (cond - uncond)``, both in one batched call."""
    if scale == 1.0:
        return step

    def guided_step(inputs: dict[str, np.ndarray]) -> np.ndarray:
        null = np.full_like(inputs["labels"], null_label)
        if scale == 0.0:
            return np.asarray(step({**inputs, "labels": null}), dtype=np.float32)
        doubled = {name: np.concatenate([value, value]) for name, value in inputs.items()}
        doubled["labels"] = np.concatenate([inputs["labels"], null])
        cond, uncond = np.split(np.asarray(step(doubled), dtype=np.float32), 2)
        return uncond + np.float32(scale) * (cond - uncond)

    return guided_step


def ddim_sample(
    step: Callable[[dict[str, np.ndarray]], np.ndarray], noise: np.ndarray, schedule: dict[str, Any], labels: np.ndarray | None = None,
    guidance_scale: float | None = None,
) -> np.ndarray:
    """MONAI's DDIM loop (eta 0; epsilon or v prediction, from ``schedule``) in numpy: images ``(N, C, H, W)`` in [-1, 1].

    Args:
        step: calls the denoiser on ``{"noisy", "timestep"[, "labels"]}`` and returns its output
            (the predicted noise, or the velocity for ``prediction_type: v_prediction``).
        noise: the starting noise, ``(N, C, H, W)`` float32.
        schedule: a diffusion bundle's ``domain_metadata.scheduler``, set to the wanted steps (:func:`ddim_schedule`).
        labels: ``(N,)`` class indices for a conditional model.
        guidance_scale: classifier-free guidance scale (default: the schedule's ``guidance.guidance_scale``, else 1).
    """
    scale, null_label = guidance_of(schedule, guidance_scale)
    if scale != 1.0:
        if labels is None:
            raise ValueError(f"guidance_scale {scale} needs class labels")
        step = guided(step, scale, null_label)
    prediction = schedule.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"ddim_sample handles epsilon and v_prediction, not {prediction!r}")
    alphas = np.asarray(schedule["alphas_cumprod"], dtype=np.float64)
    final, stride = float(schedule["final_alpha_cumprod"]), int(schedule["step_stride"])
    low, high = schedule["clip_sample_values"]
    sample = noise.astype(np.float32)
    for t in schedule["timesteps"]:
        inputs = {"noisy": sample, "timestep": np.full(len(sample), t, dtype=np.float32)}
        if labels is not None:
            inputs["labels"] = labels.astype(np.int64)
        output = np.asarray(step(inputs), dtype=np.float32)
        alpha_t = np.float32(alphas[t])
        alpha_prev = np.float32(alphas[t - stride] if t - stride >= 0 else final)
        if prediction == "epsilon":
            eps, original = output, (sample - np.sqrt(1 - alpha_t) * output) / np.sqrt(alpha_t)
        else:  # v = sqrt(a) * noise - sqrt(1 - a) * x0
            eps = np.sqrt(alpha_t) * output + np.sqrt(1 - alpha_t) * sample
            original = np.sqrt(alpha_t) * sample - np.sqrt(1 - alpha_t) * output
        if schedule.get("clip_sample", True):
            original = np.clip(original, low, high)
        sample = (np.sqrt(alpha_prev) * original + np.sqrt(1 - alpha_prev) * eps).astype(np.float32)
    return np.clip(sample, -1.0, 1.0)
