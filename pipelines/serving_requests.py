"""Request decoding and validation for ``python -m pipelines.serve``: the request forms and their checks.

Domain adapters import these names from :mod:`pipelines.serve` (which re-exports them) or from here:
:class:`RequestAdapter` (a request form), :func:`reject` (a 4xx naming the field),
:func:`as_input_array` (a JSON value checked against an input spec), :func:`read_image` (an uploaded
image checked from its header before it is decoded), :func:`json_ready` and :func:`run_once`.
The generic form, ``{"inputs": {name: one sample}}``, is :class:`GenericAdapter`.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Collection
from importlib.metadata import entry_points
from typing import Any, NoReturn

import numpy as np
from fastapi import HTTPException

from pipelines.bundle_runtime import range_problem
from pipelines.domain_registry import ENTRY_POINT_GROUP

SERVING_MODULE = "serving"  # domains/<name>/serving.py
ADAPTERS_ATTRIBUTE = "ADAPTERS"
MAX_IMAGE_PIXELS = 4096 * 4096  # read_image's default: larger images are refused from their header, before decoding


def reject(field: str, message: str, status_code: int = 422) -> NoReturn:
    """Refuse a request: raise an ``HTTPException`` whose detail names the field, e.g. ``"inputs.image: expected ..."``."""
    raise HTTPException(status_code=status_code, detail=f"{field}: {message}")


def _sample_shape(spec: dict[str, Any]) -> list[int | str]:
    """The shape of one sample of an input (its spec without the batch axis); named axes are dynamic."""
    return list(spec["shape"][1:])


def _shape_text(shape: list[int | str]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def as_input_array(value: Any, spec: dict[str, Any], field: str, sample_shape: list[int | str] | None = None) -> np.ndarray:
    """Convert a JSON value to an array of an input spec's dtype and shape, or refuse it with a 422.

    Args:
        value: nested lists (or a scalar) as decoded from JSON.
        spec: one entry of ``metadata.json``'s ``inputs`` (``name``, ``shape``, ``dtype``).
        field: the request field the value came from, named in error messages.
        sample_shape: the shape the value must have; named (string) axes take any size >= 1.
            Default: one sample (the spec's shape without its batch axis).
    """
    shape = _sample_shape(spec) if sample_shape is None else sample_shape
    dtype = np.dtype(spec["dtype"])
    expected = f"{dtype.name} array of shape {_shape_text(shape)}"
    try:
        raw = np.asarray(value)
    except ValueError:
        reject(field, f"expected a {expected}; got ragged nested lists")
    if raw.dtype.kind not in "biuf":
        reject(field, f"expected a {expected}; got non-numeric values ({str(value)[:60]})")
    if dtype.kind != "b" and (raw.dtype.kind == "b" or (raw.dtype.kind in "iuf" and _holds_a_boolean(value))):
        reject(field, f"expected a {expected} of numbers; got true/false (JSON booleans are not numbers)")
    if raw.ndim != len(shape) or any(isinstance(w, int) and w != g for w, g in zip(shape, raw.shape)) or 0 in raw.shape:
        reject(field, f"expected a {expected}; got shape {list(raw.shape)}")
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        reject(field, f"expected finite numbers; got {_first_non_finite(raw)}")
    if dtype.kind in "iub":
        if raw.dtype.kind == "f" and not np.equal(np.mod(raw, 1), 0).all():
            reject(field, f"expected integers ({dtype.name}); got fractional values")
        low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if raw.min() < low or raw.max() > high:
            reject(field, f"values must fit {dtype.name} ({low}..{high})")
    with np.errstate(over="ignore", invalid="ignore"):
        array = raw.astype(dtype, order="C")  # (not ascontiguousarray: it turns a scalar sample into shape [1])
    if dtype.kind == "f" and not np.isfinite(array).all():
        reject(field, f"values out of the {dtype.name} range; got {_first_non_finite(array, raw)}")
    problem = range_problem(array, spec)
    if problem:
        reject(field, problem)
    return array


def _holds_a_boolean(value: Any) -> bool:
    """Whether nested lists hold a JSON ``true``/``false`` (numpy reads ``[true, 2.5]`` as ``[1.0, 2.5]``)."""
    if isinstance(value, bool):
        return True
    if not isinstance(value, list):
        return False
    if value and not isinstance(value[0], list):
        return any(type(v) is bool for v in value)
    return any(_holds_a_boolean(v) for v in value)


def _first_non_finite(array: np.ndarray, shown: np.ndarray | None = None) -> str:
    """``NaN at [0, 3]``: the first non-finite value of an array and its index (``shown``: the array whose value to print)."""
    shown = array if shown is None else shown
    index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0]) if array.ndim else ()
    value = float(shown[index])
    text = "NaN" if np.isnan(value) else repr(value)
    return f"{text} at {list(index)}" if index else text


ModelCall = Callable[..., dict[str, np.ndarray]]
"""``run(**inputs) -> {output name: array}``: one call of the bundle's model (:meth:`Bundle.run`)."""


def run_once(inputs: dict[str, np.ndarray], run: ModelCall, input_names: Collection[str]) -> dict[str, np.ndarray]:
    """One model call with the arrays named as model inputs; the other arrays (request context) are passed through."""
    context = {name: array for name, array in inputs.items() if name not in input_names}
    outputs = run(**{name: inputs[name] for name in input_names})
    clash = sorted(set(context) & set(outputs))
    if clash:
        raise RuntimeError(f"request context {clash} has the names of model outputs")
    return {**outputs, **context}


def json_ready(array: np.ndarray) -> Any:
    """Nested lists for a JSON answer; NaN/infinite values (not valid JSON) become ``null``."""
    array = np.asarray(array)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return np.where(np.isfinite(array), array, None).tolist()
    return array.tolist()


class RequestAdapter:
    """Turns one JSON request into model inputs, and the model's outputs for it into a JSON answer.

    Subclass it in ``domains/<name>/serving.py`` and list the class in ``ADAPTERS``. An adapter is
    built once per inference worker with the bundle's ``metadata.json`` (as a dict), and serves
    concurrent requests: keep per-request facts in the decoded arrays, never on ``self``.

    Attributes:
        name: short name of the request form (shown by ``GET /info`` and in error messages).
        example: what a request of this form looks like (documentation, ``GET /info``).
    """

    name: str = ""
    example: str = ""

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata
        self.input_specs: dict[str, dict[str, Any]] = {spec["name"]: spec for spec in metadata["inputs"]}
        self.output_names: list[str] = [spec["name"] for spec in metadata["outputs"]]

    @classmethod
    def serves(cls, metadata: dict[str, Any]) -> bool:
        """Whether this form applies to a bundle (e.g. only to GAN bundles); default: every bundle of the domain."""
        return True

    def accepts(self, request: dict[str, Any]) -> bool:
        """Whether this request is of this adapter's form (usually: it has the adapter's key)."""
        raise NotImplementedError

    def count_items(self, request: dict[str, Any]) -> int | None:
        """How many items (rows, sequences, images) this request asks for, read cheaply before :meth:`decode`.

        The server refuses a request of more than ``--max_items`` items with a 413 before decoding
        it when this returns a number; otherwise (the default, ``None``) it counts the decoded rows.
        """
        return None

    def decode(self, request: dict[str, Any]) -> dict[str, np.ndarray]:
        """The arrays for this request, each with a leading batch axis of the same size ``n >= 1``.

        For the default :meth:`infer`: every model input, plus optional request context (arrays not
        named as a model input are not given to the model; they reach :meth:`encode` beside the
        outputs, e.g. the time of a sequence's last observation). Refuse malformed requests with
        :func:`reject` (an ``HTTPException`` naming the field).
        """
        raise NotImplementedError

    def infer(self, inputs: dict[str, np.ndarray], run: ModelCall) -> dict[str, np.ndarray]:
        """The outputs for a batch of decoded requests (their arrays concatenated along axis 0).

        The default makes one model call (:func:`run_once`), and the requests of every adapter that
        keeps it may share that call. Override it to call ``run`` several times per batch (e.g. a
        sampling loop): the server then batches only this adapter's requests together and calls
        this once per batch; every returned array must have the batch's rows on axis 0. A
        :func:`reject` here refuses the whole batch, so validate in :meth:`decode`.
        """
        return run_once(inputs, run, self.input_specs)

    def encode(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """The JSON answer from the outputs (and request context) of this request's ``n`` rows (leading axis ``n``).

        :func:`reject` here refuses this request alone (e.g. one whose values :meth:`infer` parsed for
        the whole batch and found bad)."""
        raise NotImplementedError

    @property
    def shares_model_calls(self) -> bool:
        """Whether this adapter keeps the default :meth:`infer` (its requests may be batched with other forms')."""
        return type(self).infer is RequestAdapter.infer


class GenericAdapter(RequestAdapter):
    """``{"inputs": {name: one sample}}`` -> ``{"outputs": {name: one sample's output}}``; every domain has it."""

    name = "generic"
    example = '{"inputs": {"<input name>": <one sample as nested lists>}}'

    def accepts(self, request: dict[str, Any]) -> bool:
        return "inputs" in request

    def count_items(self, request: dict[str, Any]) -> int | None:
        return 1

    def decode(self, request: dict[str, Any]) -> dict[str, np.ndarray]:
        unexpected = sorted(set(request) - {"inputs"})
        if unexpected:
            reject(unexpected[0], f"unexpected field; the generic form is {self.example}")
        inputs = request["inputs"]
        wanted = {name: f"{_shape_text(_sample_shape(s))} {s['dtype']}" for name, s in self.input_specs.items()}
        if not isinstance(inputs, dict):
            reject("inputs", f"expected an object {wanted}; got {type(inputs).__name__}")
        missing, unknown = sorted(set(self.input_specs) - set(inputs)), sorted(set(inputs) - set(self.input_specs))
        if missing:
            reject(f"inputs.{missing[0]}", f"missing; expected inputs {wanted}")
        if unknown:
            reject(f"inputs.{unknown[0]}", f"unknown input; expected inputs {wanted}")
        return {name: as_input_array(inputs[name], spec, f"inputs.{name}")[None] for name, spec in self.input_specs.items()}

    def encode(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"outputs": {name: json_ready(outputs[name][0]) for name in self.output_names}}


def domain_serving_module(domain: str) -> str | None:
    """Dotted name of a domain's serving module by convention: ``<entry point package>.serving``."""
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name == domain:
            return f"{entry_point.module}.{SERVING_MODULE}"
    return None


def domain_adapter_classes(domain: str) -> list[type[RequestAdapter]]:
    """The ``ADAPTERS`` of a domain's serving module; none when the domain has no such module."""
    module_name = domain_serving_module(domain)
    if module_name is None:
        return []
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return []
        raise
    classes = list(getattr(module, ADAPTERS_ATTRIBUTE, []))
    bad = [c for c in classes if not (isinstance(c, type) and issubclass(c, RequestAdapter))]
    if bad:
        raise TypeError(f"{module_name}.{ADAPTERS_ATTRIBUTE} must list RequestAdapter subclasses, got {bad}")
    return classes


def load_adapters(metadata: dict[str, Any]) -> list[RequestAdapter]:
    """The adapters for a bundle, chosen by its ``domain`` field: the domain's own that serve it, then the generic form."""
    own = [cls(metadata) for cls in domain_adapter_classes(metadata["domain"]) if cls.serves(metadata)]
    return own + [GenericAdapter(metadata)]




def read_image(raw: bytes, field: str, formats: Collection[str] = ("PNG", "JPEG"), max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, np.ndarray]:
    """An uploaded image's PIL mode and pixels, its size checked from the header before it is decoded.

    ``PIL.Image.open`` reads only the header; an image of more than ``max_pixels`` pixels (a
    "decompression bomb": a few kB of PNG that decode to gigabytes) is refused with a 413 before
    ``load()``, and so is one PIL itself refuses (``DecompressionBombError``). An unreadable image,
    or one not in ``formats``, gets a 400. Every refusal names ``field``.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format not in formats:
                reject(field, f"expected a {' or '.join(formats)} image; got {image.format}", status_code=400)
            width, height = image.size
            if width * height > max_pixels:
                reject(field, f"{width}x{height} pixels (width x height) is more than this server decodes ({max_pixels} pixels)", status_code=413)
            image.load()
            return image.mode, np.asarray(image)
    except Image.DecompressionBombError as error:
        reject(field, f"image too large to decode ({error})", status_code=413)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        reject(field, f"not a readable {' or '.join(formats)} image ({type(error).__name__})", status_code=400)
