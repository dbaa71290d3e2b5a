"""``python -m pipelines.serve DOMAIN (--bundle PATH | --registry DIR [--alias champion]) [--port 8000] [--max_batch_size 16] ...``.

Serves an exported bundle (``python -m pipelines.run DOMAIN export ...``) over JSON/HTTP with
LitServe, through :class:`pipelines.bundle_runtime.Bundle` (onnxruntime or TorchScript; no
Lightning, MONAI or training code is loaded in the serving processes).

With ``--registry DIR`` it serves the version an alias of the model registry names (``champion``
by default) and follows it: every ``--reload_interval`` seconds, and at once on SIGHUP, the alias is
resolved; a new version is exported to a bundle (in a child process, into ``--bundle_cache``) and
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
image), 413 when the body exceeds ``--max_payload_mb`` or the request has more than ``--max_items``
items, 504 when a request waits longer than ``--timeout``, 500 for a server fault. Error bodies are
``{"detail": "..."}``, like FastAPI's.

Batching: requests that arrive within ``--batch_timeout`` seconds of each other, up to
``--max_batch_size``, run as one batch; inputs of different shapes (e.g. sequences of different
lengths) run as separate sub-batches, and so do the requests of each adapter that overrides
:meth:`RequestAdapter.infer` (one ``infer`` call per sub-batch). A malformed request in a batch is
answered with its own 4xx and never fails the other requests of that batch.

Drain: on SIGTERM or SIGINT ``/readyz`` answers 503 at once and requests are still served for
``--drain_delay`` seconds (time for a load balancer to stop sending); then the server stops
accepting connections, finishes the requests in flight (at most ``--drain_timeout`` seconds), stops
its inference workers and exits. A second signal during the drain is ignored.

Exit status: 0 stopped after a complete drain; 3 (:data:`EXIT_DRAIN_CUT`) the drain timed out and
requests in flight were cut; 2 bad options (an unknown alias, a bundle of another domain); 1 a crash
or a registry version that could not be exported at start.
"""

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError

from pipelines import serving_metrics
from pipelines.bundle_runtime import Bundle
from pipelines.serving_api import API_PATH, BundleAPI, log_to_stderr
from pipelines.serving_options import build_parser, check_options
from pipelines.validation import check_model_label
from pipelines.serving_registry import PointerReader, RegistryWatcher
from pipelines.serving_server import (
    DrainingServer, add_operational_routes, body_error_handler, describe_bundle, install_signal_handlers, stop_children,
)  # fmt: skip
from pipelines.serving_requests import (
    ADAPTERS_ATTRIBUTE, SERVING_MODULE, GenericAdapter, ModelCall, RequestAdapter, as_input_array, domain_adapter_classes,
    domain_serving_module, json_ready, load_adapters, read_image, reject, run_once,
)  # fmt: skip

__all__ = [  # what domain adapters import from here (defined in pipelines.serving_requests; BundleAPI in pipelines.serving_api)
    "ADAPTERS_ATTRIBUTE", "SERVING_MODULE", "GenericAdapter", "ModelCall", "RequestAdapter", "as_input_array",
    "domain_adapter_classes", "domain_serving_module", "json_ready", "load_adapters", "read_image", "reject", "run_once",
    "BundleAPI", "main",
]  # fmt: skip

#: exit status when the drain timed out and requests in flight were cut
EXIT_DRAIN_CUT = 3


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
    log_to_stderr("MainProcess", args.log_level)
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
        print(f"[pipelines] server stopped; the drain timed out (--drain_timeout {args.drain_timeout} s) and requests in flight were cut", flush=True)
        return EXIT_DRAIN_CUT
    print("[pipelines] server stopped", flush=True)
    return 0


if __name__ == "__main__":
    # Run the imported module, not this ``__main__`` copy: domain adapters subclass
    # ``pipelines.serve.RequestAdapter`` and the inference worker unpickles ``pipelines.serving_api.BundleAPI``.
    from pipelines.serve import main as _main

    sys.exit(_main(sys.argv[1:]))
