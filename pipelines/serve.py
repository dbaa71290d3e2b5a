"""``python -m pipelines.serve DOMAIN --bundle PATH [--host 127.0.0.1] [--port 8000] [--max-batch-size 16] [--batch-timeout 0.01]``.

Serves an exported bundle (``python -m pipelines.run DOMAIN export ...``) over JSON/HTTP with
LitServe, through :class:`pipelines.bundle_runtime.Bundle` (onnxruntime or TorchScript; no
Lightning, MONAI or training code is loaded)::

    POST /predict   one request -> one answer (JSON); concurrent requests are batched
    GET  /health    200 "ok" once the model is loaded, 503 before
    GET  /info      the bundle's metadata and the request forms this server accepts

Request forms. Every domain accepts the generic form, checked against the input specs in the
bundle's ``metadata.json``::

    {"inputs": {"<input name>": <one sample as nested lists>}}   ->   {"outputs": {"<output name>": [...]}}

A domain adds convenience forms (an image upload, transaction rows, a sequence, a seed) in its own
package, without editing this file: a module ``serving`` beside the package its entry point names
(``domains/<name>/serving.py`` for ``domains.<name>:SPEC``) exposing ``ADAPTERS``, a list of
:class:`RequestAdapter` subclasses. Those whose :meth:`RequestAdapter.serves` accepts the bundle are
loaded; the first whose :meth:`RequestAdapter.accepts` is true answers the request; the generic form
is always tried last. An adapter whose requests need several model calls (a sampling loop)
overrides :meth:`RequestAdapter.infer`.

Errors: 422 when a field is missing, unknown or of the wrong shape/type/range (the message names the
field and what was expected), 400 when a field's content cannot be decoded (bad base64, not an
image), 413 when the body exceeds ``--max-payload-mb``, 504 when a request waits longer than
``--timeout``, 500 for a server fault. Error bodies are ``{"detail": "..."}``, like FastAPI's.

Batching: requests that arrive within ``--batch-timeout`` seconds of each other, up to
``--max-batch-size``, run as one batch; inputs of different shapes (e.g. sequences of different
lengths) run as separate sub-batches, and so do the requests of each adapter that overrides
:meth:`RequestAdapter.infer` (one ``infer`` call per sub-batch). A malformed request in a batch is
answered with its own 4xx and never fails the other requests of that batch.

SIGTERM and SIGINT stop the server gracefully: the HTTP and inference processes are stopped and
the command exits with status 0.
"""

import argparse
import importlib
import logging
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from collections.abc import Awaitable, Callable, Collection
from typing import Any, NoReturn

import litserve as ls
import numpy as np
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pipelines.bundle_runtime import Bundle
from pipelines.registry import ENTRY_POINT_GROUP, available_domains, get_domain

logger = logging.getLogger("pipelines.serve")

API_PATH = "/predict"
SERVING_MODULE = "serving"  # domains/<name>/serving.py
ADAPTERS_ATTRIBUTE = "ADAPTERS"


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
    if raw.ndim != len(shape) or any(isinstance(w, int) and w != g for w, g in zip(shape, raw.shape)) or 0 in raw.shape:
        reject(field, f"expected a {expected}; got shape {list(raw.shape)}")
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        reject(field, "contains NaN or infinite values")
    if dtype.kind in "iub":
        if raw.dtype.kind == "f" and not np.equal(np.mod(raw, 1), 0).all():
            reject(field, f"expected integers ({dtype.name}); got fractional values")
        low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if raw.min() < low or raw.max() > high:
            reject(field, f"values must fit {dtype.name} ({low}..{high})")
    with np.errstate(over="ignore", invalid="ignore"):
        array = raw.astype(dtype, order="C")  # (not ascontiguousarray: it turns a scalar sample into shape [1])
    if dtype.kind == "f" and not np.isfinite(array).all():
        reject(field, f"values out of the {dtype.name} range")
    return array


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
        """The JSON answer from the outputs (and request context) of this request's ``n`` rows (leading axis ``n``)."""
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


@dataclass
class Decoded:
    """A request turned into arrays (``rows`` samples: model inputs and context) and the adapter that answers it."""

    adapter: RequestAdapter
    arrays: dict[str, np.ndarray]
    rows: int


@dataclass
class Rejected:
    """A request refused before or during inference: answered with ``status_code`` and ``detail``."""

    status_code: int
    detail: str


@dataclass
class Answered:
    """Model outputs (and request context) for one request's rows."""

    adapter: RequestAdapter
    outputs: dict[str, np.ndarray]


class BundleAPI(ls.LitAPI):
    """LitServe API over one bundle: per-request decoding, batched inference, per-request answers.

    Refused requests travel through the batch as :class:`Rejected` values rather than exceptions,
    because LitServe fails every request of a batch when one of them raises.
    """

    def __init__(self, bundle_path: str | Path, max_batch_size: int = 16, batch_timeout: float = 0.01, log_level: str = "info") -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
        self.bundle_path = str(bundle_path)
        self.log_level = log_level

    def setup(self, device: str) -> None:
        """Load the bundle and the domain's request adapters (in the inference worker, a fresh process)."""
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s - inference-worker[%(process)d] - %(name)s - %(levelname)s - %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(self.log_level.upper())
        self.bundle = Bundle(self.bundle_path)
        self.adapters = load_adapters(self.bundle.metadata)
        logger.info("loaded %s bundle %s; request forms: %s", self.bundle.metadata["format"], self.bundle_path, ", ".join(a.name for a in self.adapters))

    def _forms(self) -> str:
        return "; ".join(f"{a.name}: {a.example}" for a in self.adapters)

    # The annotation is evaluated (no ``from __future__ import annotations`` in this module): LitServe
    # gives it to FastAPI, which then answers a body that is not a JSON object with a 422 by itself.
    def decode_request(self, request: dict[str, Any]) -> Decoded | Rejected:
        """Pick the adapter for this request's form and turn it into model inputs (or a refusal)."""
        try:
            if not request:
                reject("body", f"empty request; expected one of the forms {self._forms()}")
            adapter = next((a for a in self.adapters if a.accepts(request)), None)
            if adapter is None:
                reject(", ".join(sorted(map(str, request))), f"no request form has these fields; expected one of {self._forms()}")
            arrays = adapter.decode(request)
            rows = {int(a.shape[0]) if a.ndim else 0 for a in arrays.values()}
            missing = set(self.bundle.inputs) - set(arrays) if adapter.shares_model_calls else set()
            if missing or len(rows) != 1 or 0 in rows:
                raise RuntimeError(f"adapter {adapter.name!r} returned arrays {sorted(arrays)} with batch sizes {sorted(rows)}; inputs missing: {sorted(missing)}")
            return Decoded(adapter, arrays, rows.pop())
        except HTTPException as error:
            return Rejected(error.status_code, str(error.detail))
        except Exception:
            logger.exception("decoding a request failed")
            return Rejected(500, "internal error while decoding the request")

    def predict(self, x: Any) -> Any:
        """Run the decoded requests in groups of equal array names and shapes (one :meth:`RequestAdapter.infer` per group).

        Requests of adapters that override ``infer`` are grouped per adapter; the others may share a group.
        """
        items = x if isinstance(x, list) else [x]
        results: list[Decoded | Rejected | Answered] = list(items)
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(items):
            if isinstance(item, Decoded):
                owner = None if item.adapter.shares_model_calls else id(item.adapter)
                key = (owner, tuple(sorted((name, array.shape[1:], array.dtype.str) for name, array in item.arrays.items())))
                groups.setdefault(key, []).append(index)
        for indices in groups.values():
            for i, result in zip(indices, self._run_group([items[i] for i in indices])):
                results[i] = result
        logger.debug(
            "batch of %d request(s): %d answered, %d refused, %d sub-batch(es)",
            len(items), sum(isinstance(r, Answered) for r in results), sum(isinstance(r, Rejected) for r in results), len(groups),
        )  # fmt: skip
        return results if isinstance(x, list) else results[0]

    def _run_group(self, group: list[Decoded]) -> list[Answered | Rejected]:
        """One :meth:`RequestAdapter.infer` call on a group's concatenated arrays, split back into per-request answers."""
        adapter = group[0].adapter
        total = sum(item.rows for item in group)
        try:
            batch = {name: np.concatenate([item.arrays[name] for item in group]) for name in group[0].arrays}
            outputs = adapter.infer(batch, self.bundle.run)
            if any(np.ndim(o) == 0 or len(o) != total for o in outputs.values()):
                raise RuntimeError(f"adapter {adapter.name!r}: infer returned {({n: np.shape(o) for n, o in outputs.items()})} for {total} rows")
        except HTTPException as error:
            return [Rejected(error.status_code, str(error.detail))] * len(group)
        except ValueError as error:  # the bundle refused the inputs
            return [Rejected(422, str(error))] * len(group)
        except Exception:
            logger.exception("inference failed")
            return [Rejected(500, "internal error during inference")] * len(group)
        answers: list[Answered | Rejected] = []
        start = 0
        for item in group:
            answers.append(Answered(item.adapter, {n: o[start : start + item.rows] for n, o in outputs.items()}))
            start += item.rows
        return answers

    def encode_response(self, output: Answered | Rejected) -> Any:
        """The adapter's JSON answer, or ``{"detail": ...}`` with the refusal's status code."""
        if isinstance(output, Answered):
            try:
                return output.adapter.encode(output.outputs)
            except Exception:
                logger.exception("encoding an answer failed")
                output = Rejected(500, "internal error while encoding the answer")
        return JSONResponse(status_code=output.status_code, content={"detail": output.detail})


def describe(bundle: Bundle, adapters: list[RequestAdapter]) -> dict[str, Any]:
    """What ``GET /info`` shows about the model: bundle metadata and accepted request forms."""
    meta = bundle.metadata
    keys = ("domain", "format", "bundle_format", "created_at", "inputs", "outputs", "domain_metadata", "metrics", "git_commit")
    return {
        **{k: meta.get(k) for k in keys},
        "bundle": bundle.path.name,
        "endpoint": API_PATH,
        "request_forms": {a.name: a.example for a in adapters},
    }


def body_error_handler(forms: str) -> Callable[[Request, RequestValidationError], Awaitable[JSONResponse]]:
    """FastAPI's answer to a body that is not a JSON object, with a one-line ``detail`` like every other error.

    Invalid JSON gets a 400, valid JSON that is not an object (or no body) a 422.
    """

    async def handle(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        content_type = request.headers.get("content-type") or "none"
        if any(p.get("type") == "json_invalid" for p in problems):
            reason = (problems[0].get("ctx") or {}).get("error", "decode error")
            return JSONResponse(status_code=400, content={"detail": f"body: not valid JSON ({reason})"})
        hint = "" if "json" in content_type else f" with Content-Type: application/json (got {content_type})"
        got = "no body" if any(p.get("type") == "missing" for p in problems) else f"got {type(problems[0].get('input')).__name__}"
        return JSONResponse(status_code=422, content={"detail": f"body: expected a JSON object{hint}, one of the forms {forms}; {got}"})

    return handle


def _install_signal_handlers() -> None:
    """SIGTERM behaves like Ctrl+C (LitServe's graceful shutdown); forked helpers keep default handling."""
    owner = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked helper inherited this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _stop_children(timeout: float = 5.0) -> None:
    """Terminate processes this server started that are still alive (e.g. after an interrupted start)."""
    for child in multiprocessing.active_children():
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(timeout)
        if child.is_alive():
            child.kill()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.splitlines()[0].strip("`. "))
    parser.add_argument("domain", help=f"registered domain ({', '.join(available_domains())})")
    parser.add_argument("--bundle", required=True, help="bundle folder written by `python -m pipelines.run DOMAIN export`")
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"], help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=16, help="most requests run as one batch")
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="seconds to wait for more requests before running a batch")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait for an answer before a 504")
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    parser.add_argument("--max-payload-mb", type=float, default=16.0, help="largest request body; larger ones get a 413")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        get_domain(args.domain)
    except ValueError as error:
        parser.error(str(error))
    if not 1024 <= args.port <= 65535:
        parser.error(f"--port must be in 1024..65535, got {args.port}")
    if args.max_batch_size < 1 or args.batch_timeout < 0 or args.workers < 1 or args.timeout <= 0 or args.max_payload_mb <= 0:
        parser.error("--max-batch-size and --workers must be >= 1, --batch-timeout >= 0, --timeout and --max-payload-mb > 0")
    try:
        bundle = Bundle(args.bundle)  # fail here, before any worker starts, on a missing or incompatible bundle
    except (ValueError, OSError) as error:
        parser.error(f"--bundle {args.bundle}: {error}")
    if bundle.metadata.get("domain") != args.domain:
        parser.error(f"--bundle {args.bundle} was exported by domain {bundle.metadata.get('domain')!r}, not {args.domain!r}")
    info = describe(bundle, load_adapters(bundle.metadata))
    del bundle
    forms = "; ".join(f"{name}: {example}" for name, example in info["request_forms"].items())
    api = BundleAPI(args.bundle, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, log_level=args.log_level)
    server = ls.LitServer(
        api,
        accelerator="cpu",
        workers_per_device=args.workers,
        timeout=args.timeout,
        model_metadata=info,
        max_payload_size=int(args.max_payload_mb * 2**20),
    )
    server.app.add_exception_handler(RequestValidationError, body_error_handler(forms))
    print(
        f"[pipelines] serving {args.domain} bundle {args.bundle} ({info['format']}) on http://{args.host}:{args.port}{API_PATH}; "
        f"request forms: {', '.join(info['request_forms'])}",
        flush=True,
    )
    _install_signal_handlers()
    try:
        server.run(host=args.host, port=args.port, log_level=args.log_level, generate_client_file=False, pretty_logs=False)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_children()
    print("[pipelines] server stopped", flush=True)


if __name__ == "__main__":
    # Run the imported module, not this ``__main__`` copy: domain adapters subclass
    # ``pipelines.serve.RequestAdapter`` and the inference worker unpickles ``pipelines.serve.BundleAPI``.
    from pipelines.serve import main as _main

    _main(sys.argv[1:])
