"""Media request forms for ``python -m pipelines.serve media`` (found by convention), and a numpy DDIM loop.

Seeded generation, with a GAN or a diffusion bundle::

    {"seed": 0, "count": 4, "label": "circle"}
        -> {"images": ["<base64 PNG>", ...], "format": "png"}   (image i from seed + i)
    {"seed": 0, "count": 4, "steps": 50}                   (diffusion bundles)
        -> {"images": ["<base64 PNG>", ...], "format": "png", "steps": 50}

``seed`` (required, integer ``0 .. 2**32 - 1 - count``), ``count`` (optional, ``1 .. 64``, default 1),
``label`` (optional, conditional models only: a class name or a class index; without it image
``i`` gets class ``(seed + i) % num_classes``, so the images cycle through the classes), ``steps``
(diffusion only: DDIM steps, ``1 .. num_train_timesteps``, default the bundle's
``sampling_steps``; ``count x steps`` at most 1600 model evaluations per request, so that a request
ends within the server's timeout on a CPU). Errors are 422s naming the field.

Seeding: image ``i`` of a request uses seed ``seed + i`` and the noise
``np.random.Generator(np.random.PCG64(seed + i)).standard_normal(noise_shape, dtype=np.float32)``
(see :func:`seeded_noise_numpy`), so an image depends only on its own seed (and label): ``{"seed": 3, "count": 1}``
is the fourth image of ``{"seed": 0, "count": 4}``, and the same request always gives the same
images. It is numpy's generator, not torch's: the images are not those of ``pipelines.run media
predict`` for the same seed.

Diffusion bundles hold one denoising step (``noisy, timestep[, labels] -> noise``); the server runs
the DDIM loop (:func:`ddim_sample`, MONAI's DDIM with eta 0) around it, one batched model call per
step for all the images of the requests batched together with the same ``steps``. The images are
those of ``Diffusion.sample(noise, labels, steps)`` on the checkpoint for the same noise. The
generic form still gives one denoising step per request; a client can run :func:`ddim_sample` itself
with ``Bundle(path).run`` as the step and the schedule in ``domain_metadata.scheduler``.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from pipelines.bundle_runtime import MAX_GUIDANCE, ddim_sample, ddim_schedule, guidance_of
from pipelines.serve import ModelCall, RequestAdapter, reject

MAX_COUNT = 64
MAX_SEED = 2**32 - 1
MAX_EVALUATIONS = 1600  # count x steps of one diffusion request (32 images x 50 steps: ~16 s for the default 32x32 UNet on one CPU core)


def seeded_noise_numpy(seeds: list[int], shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """One standard-normal float32 array of ``shape`` per seed (numpy PCG64), stacked: ``(len(seeds), *shape)``."""
    return np.stack([np.random.Generator(np.random.PCG64(int(seed))).standard_normal(tuple(shape), dtype=np.float32) for seed in seeds])


def to_png_base64(image: np.ndarray) -> str:
    """A ``(C, H, W)`` image in [0, 1] (C = 1 or 3) as a base64-encoded 8-bit PNG."""
    from PIL import Image

    pixels = np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    pixels = pixels[0] if pixels.shape[0] == 1 else np.transpose(pixels, (1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


#: MONAI's DDIM loop in numpy and its schedule, from the bundle runtime (a client with only numpy and
#: onnxruntime runs the same code through ``Bundle.generate``)
ddim_schedule_for = ddim_schedule


class SeedGenerationAdapter(RequestAdapter):
    """``{"seed": S, "count": N[, "label": L]}`` -> N seeded images as base64 PNGs (GAN bundles: one model call)."""

    name = "seed"
    key = "seed"
    example = '{"seed": 0, "count": 4, "label": "<class name or index, conditional models only>"}  (count 1..64, default 1)'
    fields: tuple[str, ...] = ("seed", "count", "label")

    def __init__(self, metadata: dict[str, Any]) -> None:
        super().__init__(metadata)
        domain = metadata.get("domain_metadata", {})
        self.noise_shape: list[int] = [int(s) for s in domain.get("noise_shape", [])]
        self.class_names: list[str] = [str(n) for n in domain.get("class_names", [])]
        self.num_classes: int = int(domain.get("num_classes", 0)) if "labels" in self.input_specs else 0

    @classmethod
    def serves(cls, metadata: dict[str, Any]) -> bool:
        return "noise" in {spec["name"] for spec in metadata["inputs"]}

    def accepts(self, request: dict[str, Any]) -> bool:
        return self.key in request

    def count_items(self, request: dict[str, Any]) -> int | None:
        """Images the request asks for (``--max_items``)."""
        count = request.get("count", 1)
        return count if isinstance(count, int) and not isinstance(count, bool) else None

    @staticmethod
    def _integer(request: dict[str, Any], field: str, low: int, high: int) -> int:
        value = request[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            reject(field, f"expected an integer in {low}..{high}; got {value!r}")
        if not low <= int(value) <= high:
            reject(field, f"must be in {low}..{high}; got {int(value)}")
        return int(value)

    def _label(self, value: Any) -> int:
        if not self.num_classes:
            reject("label", "this model is not class-conditional; leave label out")
        if isinstance(value, str):
            if value not in self.class_names:
                reject("label", f"unknown class {value!r}; expected one of {self.class_names}")
            return self.class_names.index(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.num_classes:
            reject("label", f"expected a class name {self.class_names} or an index 0..{self.num_classes - 1}; got {value!r}")
        return int(value)

    def decode(self, request: dict[str, Any]) -> dict[str, np.ndarray]:
        """``noise`` (numpy-seeded, one seed per image) and, for conditional models, ``labels``."""
        unexpected = sorted(set(request) - set(self.fields))
        if unexpected:
            reject(unexpected[0], f"unexpected field; the {self.name} form is {self.example}")
        count = self._integer(request, "count", 1, MAX_COUNT) if "count" in request else 1
        seed = self._integer(request, "seed", 0, MAX_SEED - count)
        seeds = list(range(seed, seed + count))
        arrays = {"noise": seeded_noise_numpy(seeds, self.noise_shape)}
        if "labels" in self.input_specs:
            if request.get("label") is not None:
                labels = np.full(count, self._label(request["label"]), dtype=np.int64)
            else:
                labels = np.asarray(seeds, dtype=np.int64) % self.num_classes  # the class follows the seed too
            arrays["labels"] = labels
        elif request.get("label") is not None:
            self._label(request["label"])  # refuses: not conditional
        return arrays

    def encode(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        images = outputs["images"]
        return {"images": [to_png_base64(image) for image in images], "format": "png"}


class DiffusionGenerationAdapter(SeedGenerationAdapter):
    """``{"seed": S, "count": N, "steps": K[, "label": L][, "guidance_scale": W]}`` -> N images DDIM-sampled in K steps (diffusion bundles).

    The bundle holds one denoising step; :meth:`infer` runs :func:`ddim_sample` around it, one model
    call per step for all the images of a batch of requests with the same ``steps`` and guidance.
    ``guidance_scale`` (bundles of models trained with a null class, ``scheduler.guidance``; default
    the model's): classifier-free guidance, which doubles the images of each model call.
    """

    fields = ("seed", "count", "label", "steps", "guidance_scale")

    def __init__(self, metadata: dict[str, Any]) -> None:
        super().__init__(metadata)
        self.schedule: dict[str, Any] = metadata["domain_metadata"]["scheduler"]
        self.max_steps = int(self.schedule["num_train_timesteps"])
        self.default_steps = int(self.schedule["sampling_steps"])
        self.default_guidance, self.null_label = guidance_of(self.schedule)
        guidance = (
            f'"guidance_scale": {self.default_guidance}, ' if self.null_label is not None else ""
        )
        self.example = (
            '{"seed": 0, "count": 4, "steps": 50, ' + guidance + '"label": "<class name or index, conditional models only>"}  '
            f"(count 1..{MAX_COUNT}, default 1; steps 1..{self.max_steps}, default {self.default_steps}; "
            + (f"guidance_scale 0..{MAX_GUIDANCE:g}, default {self.default_guidance:g}, doubles the cost unless 0 or 1; " if guidance else "")
            + f"count x steps <= {MAX_EVALUATIONS})"
        )

    @classmethod
    def serves(cls, metadata: dict[str, Any]) -> bool:
        names = {spec["name"] for spec in metadata["inputs"]}
        return {"noisy", "timestep"} <= names and "scheduler" in metadata.get("domain_metadata", {})

    def decode(self, request: dict[str, Any]) -> dict[str, np.ndarray]:
        """The starting ``noise`` (and ``labels``) as for a GAN, and the request's ``steps`` per image."""
        arrays = super().decode(request)
        count = len(arrays["noise"])
        steps = self._integer(request, "steps", 1, self.max_steps) if "steps" in request else self.default_steps
        scale = self._guidance(request.get("guidance_scale"), "labels" in arrays)
        evaluations = count * steps * (1 if scale in (0.0, 1.0) else 2)
        if evaluations > MAX_EVALUATIONS:
            doubled = " x 2 (guidance)" if scale not in (0.0, 1.0) else ""
            reject("steps", f"count x steps must be at most {MAX_EVALUATIONS} model evaluations per request; got {count} x {steps}{doubled}: "
                   "ask for fewer images or steps per request")  # fmt: skip
        return {**arrays, "steps": np.full(count, steps, dtype=np.int64), "guidance_scale": np.full(count, scale, dtype=np.float64)}

    def _guidance(self, value: Any, conditional: bool) -> float:
        if value is None:
            return self.default_guidance
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_GUIDANCE:
            reject("guidance_scale", f"expected a number in 0..{MAX_GUIDANCE:g} (1: no guidance); got {value!r}")
        if float(value) != 1.0 and (self.null_label is None or not conditional):
            reject("guidance_scale", "this model was trained without a null class (cond_drop_prob 0): only 1 (no guidance) applies; leave it out")
        return float(value)

    def infer(self, inputs: dict[str, np.ndarray], run: ModelCall) -> dict[str, np.ndarray]:
        """Images in [0, 1] (``images``) and their ``steps``: one DDIM loop per distinct ``steps`` in the batch."""
        noise, steps, scales = inputs["noise"], inputs["steps"], inputs["guidance_scale"]
        images = np.empty_like(noise)
        for value, scale in sorted(set(zip(steps.tolist(), scales.tolist()))):
            rows = (steps == value) & (scales == scale)
            labels = inputs["labels"][rows] if "labels" in inputs else None
            schedule = ddim_schedule_for(self.schedule, int(value))
            sample = ddim_sample(lambda x: run(**x)["noise"], noise[rows], schedule, labels, scale if labels is not None else None)
            images[rows] = (sample + 1.0) / 2.0  # the denoiser works in [-1, 1]
        return {"images": images, "steps": steps, "guidance_scale": scales}

    def encode(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        answer = {**super().encode(outputs), "steps": int(outputs["steps"][0])}
        return {**answer, "guidance_scale": float(outputs["guidance_scale"][0])} if self.null_label is not None else answer


ADAPTERS = [SeedGenerationAdapter, DiffusionGenerationAdapter]
