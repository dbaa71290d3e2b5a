"""Healthcare request forms for ``python -m pipelines.serve healthcare`` (found by convention).

``{"image_base64": "<PNG or JPEG, base64>"}`` -> ``{"prediction": ..., "probabilities": {class: p}}``.

The image is decoded with PIL and scaled to [0, 1] exactly as the bundle expects (8-bit / 255,
16-bit / 65535); its channels and size must match ``domain_metadata.image_shape`` (grayscale for
1 channel, RGB for 3). It is never resized: resize it as the training data was resized. 3-D bundles
take the generic ``{"inputs": {"image": ...}}`` form. Imports numpy, PIL and ``pipelines.serve``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from pipelines.serve import RequestAdapter, read_image, reject

FIELD = "image_base64"
FORMATS = ("PNG", "JPEG")
MODE_CHANNELS = {"1": 1, "L": 1, "I;16": 1, "I;16B": 1, "I": 1, "RGB": 3}


class ImageUploadAdapter(RequestAdapter):
    """One base64-encoded PNG/JPEG image -> class probabilities by name and the predicted class(es)."""

    name = "image"
    example = '{"image_base64": "<base64 PNG or JPEG, optionally a data: URL>"}'

    def __init__(self, metadata: dict[str, Any]) -> None:
        super().__init__(metadata)
        domain = metadata.get("domain_metadata", {})
        self.image_shape: list[int] = list(domain.get("image_shape", []))
        self.class_names: list[str] = list(domain.get("class_names", []))
        self.task: str = domain.get("task", "multiclass")
        threshold = domain.get("decision_threshold")
        self.threshold: float = 0.5 if threshold is None else float(threshold)
        (self.input_name,) = self.input_specs  # healthcare bundles have one input, the image

    def accepts(self, request: dict[str, Any]) -> bool:
        return FIELD in request

    def decode(self, request: dict[str, Any]) -> dict[str, np.ndarray]:
        unexpected = sorted(set(request) - {FIELD})
        if unexpected:
            reject(unexpected[0], f"unexpected field; the image form is {self.example}")
        if len(self.image_shape) != 3:
            reject(FIELD, f"this bundle takes images of shape {self.image_shape} (3-D volumes); send them in the generic form "
                   '{"inputs": {"image": [...]}}')  # fmt: skip
        channels, height, width = self.image_shape
        text = request[FIELD]
        if not isinstance(text, str) or not text:
            reject(FIELD, f"expected a non-empty base64 string; got {type(text).__name__}")
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            reject(FIELD, "not valid base64", status_code=400)
        mode, pixels = read_image(raw, FIELD, FORMATS)  # size read from the header first: a decompression bomb is a 413, never a 500
        got_channels = MODE_CHANNELS.get(mode)
        wanted_mode = "grayscale (L)" if channels == 1 else "RGB"
        if got_channels != channels:
            reject(FIELD, f"expected a {wanted_mode} image with {channels} channel(s) of {height}x{width} pixels; got mode {mode}")
        if pixels.shape[:2] != (height, width):
            reject(FIELD, f"expected {height}x{width} pixels (height x width); got {pixels.shape[0]}x{pixels.shape[1]} (images are not resized)")
        if pixels.size and pixels.min() == pixels.max():  # the rule predict applies (domains/healthcare/readers.py; trial finding: answered 200)
            reject(FIELD, f"every pixel holds the same value ({pixels.flat[0]}): a blank image (failed export?) carries no finding to predict")
        if mode == "1":
            scaled = pixels.astype(np.float32)
        elif pixels.dtype == np.uint8:
            scaled = pixels.astype(np.float32) / 255.0
        else:  # 16-bit grayscale
            scaled = np.clip(pixels.astype(np.float32) / 65535.0, 0.0, 1.0)
        chw = scaled[None] if scaled.ndim == 2 else scaled.transpose(2, 0, 1)
        return {self.input_name: np.ascontiguousarray(chw[None], dtype=np.float32)}

    def encode(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        probabilities = outputs[self.output_names[0]][0]
        names = self.class_names or [str(i) for i in range(len(probabilities))]
        if self.task == "multilabel":
            prediction: Any = [n for n, p in zip(names, probabilities) if p > self.threshold]
        elif self.task == "binary":  # the operating point chosen on validation (metadata decision_threshold), as predict
            prediction = names[1] if probabilities[1] >= self.threshold else names[0]
        else:
            prediction = names[int(np.argmax(probabilities))]
        return {"prediction": prediction, "probabilities": {n: float(p) for n, p in zip(names, probabilities)}, "task": self.task}


ADAPTERS = [ImageUploadAdapter]
