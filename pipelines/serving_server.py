"""The server side of ``python -m pipelines.serve``: drain on SIGTERM, liveness/readiness/metrics endpoints, signals.

:class:`DrainingServer` is a ``LitServer`` whose shutdown drains (``/readyz`` 503, ``--drain_delay``
of service, stop accepting, finish the requests in flight, stop the inference workers);
:func:`add_operational_routes` adds ``/livez``, ``/readyz``, ``/metrics`` and the model headers of
``POST /predict``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from litserve.utils import WorkerSetupStatus

from pipelines import serving_metrics

logger = logging.getLogger("pipelines.serve")

PREDICT_PATH = "/predict"


class DrainingServer(ls.LitServer):
    """A ``LitServer`` whose shutdown drains: readiness off, ``drain_delay`` of service, stop accepting, finish in flight.

    LitServe's own shutdown closes the transport before the HTTP processes end, which cuts the
    requests in flight; here the inference workers run until every HTTP process has answered its
    requests (uvicorn's graceful shutdown, bounded by ``drain_timeout``).
    """

    def __init__(self, *args: Any, drain_delay: float = 0.0, drain_timeout: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drain_delay = drain_delay
        self.uvicorn_graceful_timeout = drain_timeout  # uvicorn waits this long for the requests in flight
        self.draining = multiprocessing.get_context("fork").Value("b", 0, lock=False)  # shared with the forked HTTP processes
        self._listening: list[socket.socket] = []
        self._stopping = False
        self.cut: list[int] = []  # HTTP processes killed with requests in flight (the drain timed out)

    def _start_server(self, port: int, num_uvicorn_servers: int, log_level: str, sockets: list[socket.socket], *args: Any, **kwargs: Any) -> dict:
        self._listening = list(sockets)  # this process's copy of the listening socket, closed to stop accepting
        return super()._start_server(port, num_uvicorn_servers, log_level, sockets, *args, **kwargs)

    def ready(self) -> bool:
        status = getattr(self, "workers_setup_status", None)
        return not self.draining.value and bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())

    def _perform_graceful_shutdown(self, manager: Any, uvicorn_workers: dict[int, Any], shutdown_reason: str = "normal") -> None:
        if self._stopping:  # LitServe's worker monitor calls this too when it sees the stopped inference workers
            return
        self._stopping = True
        self.draining.value = 1
        started = time.monotonic()
        http = [w for w in uvicorn_workers.values() if w.is_alive()]
        if http and self.drain_delay > 0:
            logger.info("draining: /readyz answers 503; serving requests for %.1f s more (--drain_delay)", self.drain_delay)
            time.sleep(self.drain_delay)
        for worker in http:
            worker.terminate()  # uvicorn: stop listening, finish the requests in flight, exit
        for sock in self._listening:  # other processes hold it too (LitServe's manager): stop it listening for all of them
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        cut = []
        for worker in http:
            worker.join(max(0.0, self.uvicorn_graceful_timeout + 5 - (time.monotonic() - started)))
            if worker.is_alive():
                cut.append(worker.pid)
                worker.kill()
        self.cut = cut
        if cut:
            logger.warning("HTTP process(es) %s still had requests in flight after --drain_timeout %s s; killed", cut, self.uvicorn_graceful_timeout)
        self._transport.close(send_sentinel=False)  # a sentinel would wait on the manager connection the signal interrupted
        for worker in self.inference_workers:
            worker.terminate()
            worker.join(5)
            if worker.is_alive():
                worker.kill()
        manager.shutdown()
        logger.info("drained in %.1f s", time.monotonic() - started)


def add_operational_routes(server: DrainingServer, current_info: Callable[[], dict[str, Any]]) -> None:
    """``/livez``, ``/readyz``, ``/metrics``, ``/info`` of the model served now, and the metrics and model headers on ``POST /predict``.

    ``current_info``: the served model's :func:`describe` (re-read per call: a registry alias moves).
    """

    async def livez() -> Response:
        return PlainTextResponse("ok")

    async def readyz() -> Response:
        if server.ready():
            return PlainTextResponse("ready")
        return PlainTextResponse("draining" if server.draining.value else "not ready: the model is loading", status_code=503)

    async def metrics() -> Response:
        body, content_type = serving_metrics.render()
        return Response(body, media_type=content_type)

    async def info() -> Response:
        settings = {"workers_per_device": server.workers_per_device, "timeout": server.timeout, "max_payload_size": server.max_payload_size}
        return JSONResponse({"model": current_info(), "server": settings})

    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/info"]  # LitServe's: fixed at start
    for path, endpoint in (("/livez", livez), ("/readyz", readyz), ("/metrics", metrics), ("/info", info)):
        server.app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)

    def headers() -> dict[str, str]:
        model = current_info()
        return {"X-Model-Name": model["name"], "X-Model-Version": model["version"], "X-Model-Checkpoint-Sha256": model["checkpoint_sha256"]}

    server.app.add_middleware(serving_metrics.PredictMetricsMiddleware, path=PREDICT_PATH, headers=headers)


def model_identity(metadata: dict[str, Any], name: str | None = None, version: str | None = None) -> dict[str, str]:
    """The served model's name, version and checkpoint sha256 (``/info``, response headers, ``pipelines_serve_model_info``).

    Name and version: the command's ``--model_name``/``--model_version``, else the bundle's
    ``model_name``/``model_version`` (``export --model_name/--model_version``), else the domain and
    ``sha256-`` with the first 12 hex digits of the source checkpoint's sha256.
    """
    sha256 = str((metadata.get("source_checkpoint") or {}).get("sha256") or "unknown")
    return {
        "name": name or metadata.get("model_name") or metadata["domain"],
        "version": version or metadata.get("model_version") or (f"sha256-{sha256[:12]}" if sha256 != "unknown" else "unknown"),
        "checkpoint_sha256": sha256,
    }


def describe(meta: dict[str, Any], bundle: Path, forms: dict[str, str], identity: dict[str, str]) -> dict[str, Any]:
    """What ``GET /info`` shows about the model: its identity, bundle metadata (and registry origin) and accepted request forms."""
    keys = ("domain", "format", "bundle_format", "created_at", "inputs", "outputs", "domain_metadata", "metrics", "git_commit", "registry")
    return {
        **identity,
        **{k: meta.get(k) for k in keys},
        "bundle": bundle.name,
        "endpoint": PREDICT_PATH,
        "request_forms": forms,
    }


def describe_bundle(metadata: dict[str, Any], bundle: Path, name: str | None, version: str | None) -> dict[str, Any]:
    """:func:`describe` of a bundle, with the request forms of its domain's adapters."""
    from pipelines.serving_requests import load_adapters

    forms = {a.name: a.example for a in load_adapters(metadata)}
    return describe(metadata, bundle, forms, model_identity(metadata, name, version))


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


def install_signal_handlers(on_hangup: Callable[[], None] | None = None) -> None:
    """SIGTERM and SIGINT start the drain (as Ctrl+C does in LitServe); a second one is ignored; forked helpers keep default handling.

    SIGHUP calls ``on_hangup`` (look at the registry now) in the main process; other processes ignore it.
    """
    owner = os.getpid()
    received: list[int] = []

    def hangup(signum: int, frame: Any) -> None:
        if os.getpid() == owner and on_hangup is not None:
            on_hangup()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked helper inherited this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if received:
            logger.warning("signal %d ignored: already draining", signum)
            return
        received.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hangup)


def stop_children(timeout: float = 5.0) -> None:
    """Terminate processes this server started that are still alive (e.g. after an interrupted start)."""
    for child in multiprocessing.active_children():
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(timeout)
        if child.is_alive():
            child.kill()
