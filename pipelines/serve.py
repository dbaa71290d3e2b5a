"""``python -m pipelines.serve DOMAIN (--bundle PATH | --registry DIR [--alias champion]) [--port 8000] [--max-batch-size 16] ...``.

Serves an exported bundle (``python -m pipelines.run DOMAIN export ...``) over JSON/HTTP with
LitServe, through :class:`pipelines.bundle_runtime.Bundle` (onnxruntime or TorchScript; no
Lightning, MONAI or training code is loaded in the serving processes).

With ``--registry DIR`` it serves the version an alias of the model registry names (``champion``
by default) and follows it: every ``--reload-interval`` seconds, and at once on SIGHUP, the alias is
resolved; a new version is exported to a bundle (in a child process, into ``--bundle-cache``) and
swapped in by the inference workers without dropping a request: requests decoded before the swap
are answered by the old model, later ones by the new (:mod:`pipelines.serving_registry`). A version
that fails to export or load is logged and counted, and the old model keeps serving. The headers
and ``/info`` name the registry version (``X-Model-Version: v0002``) and the sha256 of its
``model.safetensors``::

    POST /predict   one request -> one answer (JSON); concurrent requests are batched. Headers
                    X-Model-Name, X-Model-Version, X-Model-Checkpoint-Sha256 of the model that answered
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
its inference workers and exits. A second signal during the drain is ignored.

Exit status: 0 stopped after a complete drain; 3 (:data:`EXIT_DRAIN_CUT`) the drain timed out and
requests in flight were cut; 2 bad options (an unknown alias, a bundle of another domain); 1 a crash
or a registry version that could not be exported at start.
"""

import argparse
import logging
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pipelines import serving_metrics
from pipelines.bundle_runtime import Bundle
from pipelines.request_log import RequestLog, item_features, item_outputs
from pipelines.request_log import now as log_time
from pipelines.serving_options import build_parser, check_options
from pipelines.validation import check_model_label
from pipelines.serving_registry import Loaded, ModelSlot, PointerReader, RegistryWatcher
from pipelines.serving_server import (
    PREDICT_PATH, DrainingServer, add_operational_routes, body_error_handler, describe_bundle, install_signal_handlers, model_identity, stop_children,
)  # fmt: skip
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

API_PATH = PREDICT_PATH
#: exit status when the drain timed out and requests in flight were cut
EXIT_DRAIN_CUT = 3
#: infer outputs that are not answers: the model inputs an adapter prepared in infer (logged as features), a per-row refusal
LOGGED_INPUT, REFUSAL = "input.", "refusal"


@dataclass
class Decoded:
    """A request turned into arrays (``rows`` samples: model inputs and context) and the adapter that answers it."""

    adapter: RequestAdapter
    arrays: dict[str, np.ndarray]
    rows: int
    model: Loaded


@dataclass
class Rejected:
    """A request refused before or during inference: answered with ``status_code`` and ``detail``."""

    status_code: int
    detail: str
    model: Loaded | None = None


@dataclass
class Answered:
    """Model outputs (and request context) for one request's rows."""

    adapter: RequestAdapter
    outputs: dict[str, np.ndarray]
    model: Loaded


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
        self, bundle_path: str | Path | None = None, max_batch_size: int = 16, batch_timeout: float = 0.01, log_level: str = "info",
        max_items: int = 1000, model_name: str | None = None, model_version: str | None = None, follow: str | Path | None = None,
        request_log: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
        self.bundle_path = str(bundle_path) if bundle_path is not None else None
        self.follow = str(follow) if follow is not None else None  # a bundle cache whose current.json names the model to serve
        self.log_level = log_level
        self.max_items = max_items
        self.model_name, self.model_version = model_name, model_version
        self.request_log_options = request_log  # RequestLog's arguments; None: no log

    def setup(self, device: str) -> None:
        """Load the bundle and the domain's request adapters (in the inference worker, a fresh process).

        Following a registry alias, a thread loads each newly published bundle and swaps it in (:class:`ModelSlot`).
        """
        _log_to_stderr("inference-worker", self.log_level)
        # Ctrl+C reaches every process of the terminal's group: this worker must outlive the drain, and
        # the server stops it (SIGTERM) once the requests in flight are answered.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.request_log = RequestLog(**self.request_log_options) if self.request_log_options else None
        if self.follow is not None:
            self.slot: Any = ModelSlot(self._load, Path(self.follow))
        else:
            self.slot = type("Fixed", (), {"current": self._load(self.bundle_path, None)})()

    def _load(self, bundle_path: str, identity: dict[str, str] | None) -> Loaded:
        bundle = Bundle(bundle_path)
        adapters = load_adapters(bundle.metadata)
        loaded = Loaded(bundle, adapters, identity or model_identity(bundle.metadata, self.model_name, self.model_version), bundle_path)
        serving_metrics.set_model_info(loaded)
        logger.info("loaded %s bundle %s (%s); request forms: %s", bundle.metadata["format"], bundle_path, loaded.identity["version"], ", ".join(a.name for a in adapters))
        return loaded

    @staticmethod
    def _forms(model: Loaded) -> str:
        return "; ".join(f"{a.name}: {a.example}" for a in model.adapters)

    # The annotation is evaluated (no ``from __future__ import annotations`` in this module): LitServe
    # gives it to FastAPI, which then answers a body that is not a JSON object with a 422 by itself.
    def decode_request(self, request: dict[str, Any]) -> Decoded | Rejected:
        """Pick the adapter for this request's form and turn it into model inputs (or a refusal); the model serving now predicts it."""
        model = self.slot.current
        try:
            if not request:
                reject("body", f"empty request; expected one of the forms {self._forms(model)}")
            adapter = next((a for a in model.adapters if a.accepts(request)), None)
            if adapter is None:
                reject(", ".join(sorted(map(str, request))), f"no request form has these fields; expected one of {self._forms(model)}")
            self._check_items(adapter, adapter.count_items(request))
            arrays = adapter.decode(request)
            rows = {int(a.shape[0]) if a.ndim else 0 for a in arrays.values()}
            missing = set(model.bundle.inputs) - set(arrays) if adapter.shares_model_calls else set()
            if missing or len(rows) != 1 or 0 in rows:
                raise RuntimeError(f"adapter {adapter.name!r} returned arrays {sorted(arrays)} with batch sizes {sorted(rows)}; inputs missing: {sorted(missing)}")
            count = rows.pop()
            self._check_items(adapter, count)
            serving_metrics.metrics().items.observe(count)
            return Decoded(adapter, arrays, count, model)
        except HTTPException as error:
            return Rejected(error.status_code, str(error.detail), model)
        except Exception:
            logger.exception("decoding a request failed")
            return Rejected(500, "internal error while decoding the request", model)

    def _check_items(self, adapter: RequestAdapter, count: int | None) -> None:
        """Refuse (413) a request of more than ``--max-items`` items: one huge request must not starve the others."""
        if count is not None and count > self.max_items:
            reject(adapter.name, f"{count} items in one request; this server takes at most {self.max_items} per request "
                   f"(--max-items {self.max_items}): send them in several requests", status_code=413)  # fmt: skip

    def predict(self, x: Any) -> Any:
        """Run the decoded requests in groups of equal array names and shapes (one :meth:`RequestAdapter.infer` per group).

        Requests of adapters that override ``infer`` are grouped per adapter; the others may share a group.
        Requests decoded by different models (a hot reload during the batch) never share a group.
        """
        items = x if isinstance(x, list) else [x]
        serving_metrics.metrics().batch_size.observe(len(items))
        results: list[Decoded | Rejected | Answered] = list(items)
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(items):
            if isinstance(item, Decoded):
                owner = None if item.adapter.shares_model_calls else id(item.adapter)
                key = (id(item.model), owner, tuple(sorted((name, array.shape[1:], array.dtype.str) for name, array in item.arrays.items())))
                groups.setdefault(key, []).append(index)
        for indices in groups.values():
            for i, result in zip(indices, self._run_group([items[i] for i in indices])):
                results[i] = result
        if self.request_log is not None:
            self._log_requests(items, results)
        logger.debug(
            "batch of %d request(s): %d answered, %d refused, %d sub-batch(es)",
            len(items), sum(isinstance(r, Answered) for r in results), sum(isinstance(r, Rejected) for r in results), len(groups),
        )  # fmt: skip
        return results if isinstance(x, list) else results[0]

    def _log_requests(self, items: list, results: list) -> None:
        """Append the answered items to the request log (a ``--request-log-sample`` share of the requests); never fails the batch."""
        try:
            stamp, records = log_time(), []
            for item, result in zip(items, results):
                refused = result.outputs.get(REFUSAL) if isinstance(result, Answered) else None
                if isinstance(result, Answered) and (refused is None or refused[0] is None) and self.request_log.wanted():
                    identity, reference = result.model.identity, result.model.bundle.metadata.get("reference_statistics")
                    inputs = {n: a for n, a in item.arrays.items() if n in result.model.bundle.inputs}
                    # an adapter that prepares its model inputs in infer (finance rows) hands them back as "input.NAME"
                    inputs.update({n.removeprefix(LOGGED_INPUT): a for n, a in result.outputs.items() if n.startswith(LOGGED_INPUT)})
                    outputs = {n: a for n, a in result.outputs.items() if not n.startswith(LOGGED_INPUT) and n != REFUSAL}
                    for i in range(item.rows):
                        records.append({"time": stamp, "model": identity["name"], "version": identity["version"], "form": item.adapter.name,
                                        "features": item_features(inputs, i, reference), "outputs": item_outputs(outputs, i)})  # fmt: skip
            self.request_log.append(records)
        except Exception:  # noqa: BLE001 - the answers matter more than their log
            logger.exception("writing the request log failed")

    def _run_group(self, group: list[Decoded]) -> list[Answered | Rejected]:
        """One :meth:`RequestAdapter.infer` call on a group's concatenated arrays, split back into per-request answers."""
        adapter, model = group[0].adapter, group[0].model
        total = sum(item.rows for item in group)
        try:
            batch = {name: np.concatenate([item.arrays[name] for item in group]) for name in group[0].arrays}
            outputs = adapter.infer(batch, model.bundle.run)
            if any(np.ndim(o) == 0 or len(o) != total for o in outputs.values()):
                raise RuntimeError(f"adapter {adapter.name!r}: infer returned {({n: np.shape(o) for n, o in outputs.items()})} for {total} rows")
        except HTTPException as error:
            return [Rejected(error.status_code, str(error.detail), model)] * len(group)
        except ValueError as error:  # the bundle refused the inputs
            return [Rejected(422, str(error), model)] * len(group)
        except Exception:
            logger.exception("inference failed")
            return [Rejected(500, "internal error during inference", model)] * len(group)
        answers: list[Answered | Rejected] = []
        start = 0
        for item in group:
            answers.append(Answered(item.adapter, {n: o[start : start + item.rows] for n, o in outputs.items()}, model))
            start += item.rows
        return answers

    def encode_response(self, output: Answered | Rejected) -> Any:
        """The adapter's JSON answer, or ``{"detail": ...}`` with the refusal's status code; headers name the model that made it."""
        if isinstance(output, Answered):
            try:
                return JSONResponse(content=output.adapter.encode(output.outputs), headers=output.model.headers)
            except HTTPException as error:  # a request refused by its adapter's batch step (e.g. a value that does not parse)
                output = Rejected(error.status_code, str(error.detail), output.model)
            except Exception:
                logger.exception("encoding an answer failed")
                output = Rejected(500, "internal error while encoding the answer", output.model)
        headers = output.model.headers if output.model is not None else None
        return JSONResponse(status_code=output.status_code, content={"detail": output.detail}, headers=headers)


def _start_registry(parser: argparse.ArgumentParser, args: argparse.Namespace, cache: Path) -> RegistryWatcher:
    """Resolve and export the alias's version before any worker starts (bad alias: exit 2; failed export: exit 1)."""
    watcher = RegistryWatcher(Path(args.registry), args.domain, args.alias, cache, args.export_format, args.reload_interval)
    try:
        watcher.first(lambda metadata, bundle: describe_bundle(metadata, bundle, args.model_name, None))
    except ValueError as error:
        parser.error(f"--registry {args.registry} --alias {args.alias}: {error}")
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    return watcher


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.splitlines()[0].strip("`. "))
    args = parser.parse_args(argv)
    check_options(parser, args)
    metrics_dir = tempfile.mkdtemp(prefix="pipelines-serve-metrics-")
    cache = Path(args.bundle_cache or tempfile.mkdtemp(prefix="pipelines-serve-bundles-")) if args.registry else None
    watcher = None
    try:
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            watcher = _start_registry(parser, args, cache)
            current_info = lambda reader=PointerReader(cache): reader()["info"]  # noqa: E731
        else:
            try:
                bundle = Bundle(args.bundle)  # fail here, before any worker starts, on a missing or incompatible bundle
            except (ValueError, OSError) as error:
                parser.error(f"--bundle {args.bundle}: {error}")
            if bundle.metadata.get("domain") != args.domain:
                parser.error(f"--bundle {args.bundle} was exported by domain {bundle.metadata.get('domain')!r}, not {args.domain!r}")
            try:
                for key in ("model_name", "model_version"):  # a bundle written by hand or by an older export
                    check_model_label(bundle.metadata.get(key), f"--bundle {args.bundle}: metadata.json {key}")
            except ValueError as error:
                parser.error(str(error))
            fixed = describe_bundle(bundle.metadata, Path(args.bundle), args.model_name, args.model_version)
            current_info = lambda: fixed  # noqa: E731
            del bundle
        return _serve(args, current_info, watcher, metrics_dir, cache)
    finally:
        if watcher is not None:
            watcher.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if cache is not None and not args.bundle_cache:
            shutil.rmtree(cache, ignore_errors=True)


def _request_log_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.request_log:
        return None
    return {"path": str(Path(args.request_log).resolve()), "max_bytes": int(args.request_log_max_mb * 2**20), "keep": args.request_log_keep, "sample": args.request_log_sample}


def _serve(args: argparse.Namespace, current_info: Callable[[], dict[str, Any]], watcher: RegistryWatcher | None, metrics_dir: str, cache: Path | None) -> int:
    serving_metrics.enable_multiprocess(metrics_dir)  # before any metric exists and before any worker starts
    info = current_info()
    forms = "; ".join(f"{name}: {example}" for name, example in info["request_forms"].items())
    api = BundleAPI(
        args.bundle, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, log_level=args.log_level, max_items=args.max_items,
        model_name=args.model_name, model_version=args.model_version, follow=cache, request_log=_request_log_options(args),
    )  # fmt: skip
    server = DrainingServer(
        api, accelerator="cpu", workers_per_device=args.workers, timeout=args.timeout, model_metadata=info,
        max_payload_size=int(args.max_payload_mb * 2**20), drain_delay=args.drain_delay, drain_timeout=args.drain_timeout,
    )  # fmt: skip
    server.app.add_exception_handler(RequestValidationError, body_error_handler(forms))
    add_operational_routes(server, current_info)
    source = f"registry {args.registry} alias {args.alias} (reloads every {args.reload_interval} s and on SIGHUP)" if watcher else f"bundle {args.bundle}"
    print(
        f"[pipelines] serving {args.domain} {source} ({info['format']}, {info['name']} {info['version']}) "
        f"on http://{args.host}:{args.port}{API_PATH}; request forms: {', '.join(info['request_forms'])}",
        flush=True,
    )
    _log_to_stderr("MainProcess", args.log_level)
    install_signal_handlers(watcher.wake.set if watcher else None)
    if watcher is not None:
        watcher.start(lambda metadata, bundle: describe_bundle(metadata, bundle, args.model_name, None))
    try:
        server.run(host=args.host, port=args.port, log_level=args.log_level, generate_client_file=False, pretty_logs=False)
    except KeyboardInterrupt:
        pass
    finally:
        stop_children()
    if server.cut or serving_metrics.total("requests_cut_total"):
        print(f"[pipelines] server stopped; the drain timed out (--drain-timeout {args.drain_timeout} s) and requests in flight were cut", flush=True)
        return EXIT_DRAIN_CUT
    print("[pipelines] server stopped", flush=True)
    return 0


if __name__ == "__main__":
    # Run the imported module, not this ``__main__`` copy: domain adapters subclass
    # ``pipelines.serve.RequestAdapter`` and the inference worker unpickles ``pipelines.serve.BundleAPI``.
    from pipelines.serve import main as _main

    sys.exit(_main(sys.argv[1:]))
