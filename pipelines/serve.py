"""``python -m pipelines.serve DOMAIN --bundle PATH [--host 127.0.0.1] [--port 8000] [--max-batch-size 16] [--batch-timeout 0.01]``.

Serves an exported bundle (``python -m pipelines.run DOMAIN export ...``) over JSON/HTTP with
LitServe, through :class:`pipelines.bundle_runtime.Bundle` (onnxruntime or TorchScript; no
Lightning, MONAI or training code is loaded)::

    POST /predict   one request -> one answer (JSON); concurrent requests are batched. Headers
                    X-Model-Name, X-Model-Version, X-Model-Checkpoint-Sha256 on every answer
    GET  /health    200 "ok" once the model is loaded, 503 before
    GET  /livez     200 "ok" while the HTTP process runs (liveness)
    GET  /readyz    200 "ready" once the model is loaded; 503 before, and while draining (readiness)
    GET  /info      the bundle's metadata, the model's name, version and checkpoint sha256, the request forms
    GET  /metrics   Prometheus metrics (see :mod:`pipelines.serving_metrics`)

Request forms. Every domain accepts the generic form, checked against the input specs in the
bundle's ``metadata.json``::

    {"inputs": {"<input name>": <one sample as nested lists>}}   ->   {"outputs": {"<output name>": [...]}}

A domain adds convenience forms (an image upload, transaction rows, a sequence, a seed) in its own
package, without editing this file: a module ``serving`` beside the package its entry point names
(``domains/<name>/serving.py`` for ``domains.<name>:SPEC``) exposing ``ADAPTERS``, a list of
:class:`RequestAdapter` subclasses (see :mod:`pipelines.serving_requests`). Those whose
:meth:`RequestAdapter.serves` accepts the bundle are loaded; the first whose
:meth:`RequestAdapter.accepts` is true answers the request; the generic form is always tried last.
An adapter whose requests need several model calls (a sampling loop) overrides :meth:`RequestAdapter.infer`.

Errors: 422 when a field is missing, unknown or of the wrong shape/type/range (the message names the
field and what was expected), 400 when a field's content cannot be decoded (bad base64, not an
image), 413 when the body exceeds ``--max-payload-mb`` or the request has more than ``--max-items``
items, 504 when a request waits longer than ``--timeout``, 500 for a server fault. Error bodies are
``{"detail": "..."}``, like FastAPI's.

Batching: requests that arrive within ``--batch-timeout`` seconds of each other, up to
``--max-batch-size``, run as one batch; inputs of different shapes (e.g. sequences of different
lengths) run as separate sub-batches, and so do the requests of each adapter that overrides
:meth:`RequestAdapter.infer` (one ``infer`` call per sub-batch). A malformed request in a batch is
answered with its own 4xx and never fails the other requests of that batch.

Drain: on SIGTERM or SIGINT ``/readyz`` answers 503 at once and requests are still served for
``--drain-delay`` seconds (time for a load balancer to stop sending); then the server stops
accepting connections, finishes the requests in flight (at most ``--drain-timeout`` seconds), stops
its inference workers and exits with status 0. A second signal during the drain is ignored.
"""

import argparse
import logging
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pipelines import serving_metrics
from pipelines.bundle_runtime import Bundle
from pipelines.domain_registry import available_domains, get_domain
from pipelines.serving_server import DrainingServer, add_operational_routes, install_signal_handlers, stop_children
from pipelines.serving_requests import (
    ADAPTERS_ATTRIBUTE, SERVING_MODULE, GenericAdapter, ModelCall, RequestAdapter, as_input_array, domain_adapter_classes,
    domain_serving_module, json_ready, load_adapters, read_image, reject, run_once,
)  # fmt: skip

__all__ = [  # what domain adapters import from here (defined in pipelines.serving_requests)
    "ADAPTERS_ATTRIBUTE", "SERVING_MODULE", "GenericAdapter", "ModelCall", "RequestAdapter", "as_input_array",
    "domain_adapter_classes", "domain_serving_module", "json_ready", "load_adapters", "read_image", "reject", "run_once",
    "BundleAPI", "main",
]  # fmt: skip

logger = logging.getLogger("pipelines.serve")

API_PATH = "/predict"


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


def _log_to_stderr(process: str, level: str) -> None:
    """This module's log records to stderr, marked with the process's role and id."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s - {process}[%(process)d] - %(name)s - %(levelname)s - %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


class BundleAPI(ls.LitAPI):
    """LitServe API over one bundle: per-request decoding, batched inference, per-request answers.

    Refused requests travel through the batch as :class:`Rejected` values rather than exceptions,
    because LitServe fails every request of a batch when one of them raises.
    """

    def __init__(
        self, bundle_path: str | Path, max_batch_size: int = 16, batch_timeout: float = 0.01, log_level: str = "info", max_items: int = 1000
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
        self.bundle_path = str(bundle_path)
        self.log_level = log_level
        self.max_items = max_items

    def setup(self, device: str) -> None:
        """Load the bundle and the domain's request adapters (in the inference worker, a fresh process)."""
        _log_to_stderr("inference-worker", self.log_level)
        # Ctrl+C reaches every process of the terminal's group: this worker must outlive the drain, and
        # the server stops it (SIGTERM) once the requests in flight are answered.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
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
            self._check_items(adapter, adapter.count_items(request))
            arrays = adapter.decode(request)
            rows = {int(a.shape[0]) if a.ndim else 0 for a in arrays.values()}
            missing = set(self.bundle.inputs) - set(arrays) if adapter.shares_model_calls else set()
            if missing or len(rows) != 1 or 0 in rows:
                raise RuntimeError(f"adapter {adapter.name!r} returned arrays {sorted(arrays)} with batch sizes {sorted(rows)}; inputs missing: {sorted(missing)}")
            count = rows.pop()
            self._check_items(adapter, count)
            serving_metrics.metrics().items.observe(count)
            return Decoded(adapter, arrays, count)
        except HTTPException as error:
            return Rejected(error.status_code, str(error.detail))
        except Exception:
            logger.exception("decoding a request failed")
            return Rejected(500, "internal error while decoding the request")

    def _check_items(self, adapter: RequestAdapter, count: int | None) -> None:
        """Refuse (413) a request of more than ``--max-items`` items: one huge request must not starve the others."""
        if count is not None and count > self.max_items:
            reject(adapter.name, f"{count} items in one request; this server takes at most {self.max_items} per request "
                   f"(--max-items {self.max_items}): send them in several requests", status_code=413)  # fmt: skip

    def predict(self, x: Any) -> Any:
        """Run the decoded requests in groups of equal array names and shapes (one :meth:`RequestAdapter.infer` per group).

        Requests of adapters that override ``infer`` are grouped per adapter; the others may share a group.
        """
        items = x if isinstance(x, list) else [x]
        serving_metrics.metrics().batch_size.observe(len(items))
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


def model_identity(metadata: dict[str, Any], name: str | None = None, version: str | None = None) -> dict[str, str]:
    """The served model's name, version and checkpoint sha256 (``/info``, response headers, ``pipelines_serve_model_info``).

    Name and version: the command's ``--model-name``/``--model-version``, else the bundle's
    ``model_name``/``model_version`` (``export --model_name/--model_version``), else the domain and
    ``sha256-`` with the first 12 hex digits of the source checkpoint's sha256.
    """
    sha256 = str((metadata.get("source_checkpoint") or {}).get("sha256") or "unknown")
    return {
        "name": name or metadata.get("model_name") or metadata["domain"],
        "version": version or metadata.get("model_version") or (f"sha256-{sha256[:12]}" if sha256 != "unknown" else "unknown"),
        "checkpoint_sha256": sha256,
    }


def describe(bundle: Bundle, adapters: list[RequestAdapter], identity: dict[str, str]) -> dict[str, Any]:
    """What ``GET /info`` shows about the model: its identity, bundle metadata and accepted request forms."""
    meta = bundle.metadata
    keys = ("domain", "format", "bundle_format", "created_at", "inputs", "outputs", "domain_metadata", "metrics", "git_commit")
    return {
        **identity,
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
    parser.add_argument("--max-items", type=int, default=1000, help="most items (samples, rows, sequences, images) in one request; more get a 413")
    parser.add_argument("--drain-delay", type=float, default=0.0, help="seconds to keep serving after SIGTERM with /readyz at 503")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to wait for the requests in flight once draining")
    parser.add_argument("--model-name", default=None, help="name in /info, X-Model-Name and metrics (default: the bundle's, else the domain)")
    parser.add_argument("--model-version", default=None, help="version (default: the bundle's, else sha256-<checkpoint sha256 prefix>)")
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
    if min(args.max_batch_size, args.workers, args.max_items) < 1 or min(args.batch_timeout, args.drain_delay) < 0 or min(args.timeout, args.max_payload_mb, args.drain_timeout) <= 0:
        parser.error("--max-batch-size, --workers and --max-items must be >= 1, --batch-timeout and --drain-delay >= 0, "
                     "--timeout, --max-payload-mb and --drain-timeout > 0")  # fmt: skip
    try:
        bundle = Bundle(args.bundle)  # fail here, before any worker starts, on a missing or incompatible bundle
    except (ValueError, OSError) as error:
        parser.error(f"--bundle {args.bundle}: {error}")
    if bundle.metadata.get("domain") != args.domain:
        parser.error(f"--bundle {args.bundle} was exported by domain {bundle.metadata.get('domain')!r}, not {args.domain!r}")
    identity = model_identity(bundle.metadata, args.model_name, args.model_version)
    info = describe(bundle, load_adapters(bundle.metadata), identity)
    del bundle
    metrics_dir = tempfile.mkdtemp(prefix="pipelines-serve-metrics-")
    serving_metrics.enable_multiprocess(metrics_dir)  # before any metric exists and before any worker starts
    serving_metrics.metrics().model_info.labels(domain=args.domain, format=info["format"], **identity).set(1)
    forms = "; ".join(f"{name}: {example}" for name, example in info["request_forms"].items())
    api = BundleAPI(args.bundle, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, log_level=args.log_level, max_items=args.max_items)
    server = DrainingServer(
        api, accelerator="cpu", workers_per_device=args.workers, timeout=args.timeout, model_metadata=info,
        max_payload_size=int(args.max_payload_mb * 2**20), drain_delay=args.drain_delay, drain_timeout=args.drain_timeout,
    )  # fmt: skip
    server.app.add_exception_handler(RequestValidationError, body_error_handler(forms))
    add_operational_routes(server, identity, API_PATH)
    print(
        f"[pipelines] serving {args.domain} bundle {args.bundle} ({info['format']}, {identity['name']} {identity['version']}) "
        f"on http://{args.host}:{args.port}{API_PATH}; request forms: {', '.join(info['request_forms'])}",
        flush=True,
    )
    _log_to_stderr("MainProcess", args.log_level)
    install_signal_handlers()
    try:
        server.run(host=args.host, port=args.port, log_level=args.log_level, generate_client_file=False, pretty_logs=False)
    except KeyboardInterrupt:
        pass
    finally:
        stop_children()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    print("[pipelines] server stopped", flush=True)


if __name__ == "__main__":
    # Run the imported module, not this ``__main__`` copy: domain adapters subclass
    # ``pipelines.serve.RequestAdapter`` and the inference worker unpickles ``pipelines.serve.BundleAPI``.
    from pipelines.serve import main as _main

    _main(sys.argv[1:])
