"""The server side of ``python -m pipelines.serve``: drain on SIGTERM, liveness/readiness/metrics endpoints, signals.

:class:`DrainingServer` is a ``LitServer`` whose shutdown drains (``/readyz`` 503, ``--drain-delay``
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
from typing import Any

import litserve as ls
from fastapi.responses import PlainTextResponse, Response
from litserve.utils import WorkerSetupStatus

from pipelines import serving_metrics

logger = logging.getLogger("pipelines.serve")


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
            logger.info("draining: /readyz answers 503; serving requests for %.1f s more (--drain-delay)", self.drain_delay)
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
        if cut:
            logger.warning("HTTP process(es) %s still had requests in flight after --drain-timeout %s s; killed", cut, self.uvicorn_graceful_timeout)
        self._transport.close(send_sentinel=False)  # a sentinel would wait on the manager connection the signal interrupted
        for worker in self.inference_workers:
            worker.terminate()
            worker.join(5)
            if worker.is_alive():
                worker.kill()
        manager.shutdown()
        logger.info("drained in %.1f s", time.monotonic() - started)


def add_operational_routes(server: DrainingServer, identity: dict[str, str], predict_path: str) -> None:
    """``/livez``, ``/readyz``, ``/metrics``, and the metrics and model headers on ``POST /predict``."""

    async def livez() -> Response:
        return PlainTextResponse("ok")

    async def readyz() -> Response:
        if server.ready():
            return PlainTextResponse("ready")
        return PlainTextResponse("draining" if server.draining.value else "not ready: the model is loading", status_code=503)

    async def metrics() -> Response:
        body, content_type = serving_metrics.render()
        return Response(body, media_type=content_type)

    for path, endpoint in (("/livez", livez), ("/readyz", readyz), ("/metrics", metrics)):
        server.app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)
    headers = {"X-Model-Name": identity["name"], "X-Model-Version": identity["version"], "X-Model-Checkpoint-Sha256": identity["checkpoint_sha256"]}
    server.app.add_middleware(serving_metrics.PredictMetricsMiddleware, path=predict_path, headers=headers)


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT start the drain (as Ctrl+C does in LitServe); a second one is ignored; forked helpers keep default handling."""
    owner = os.getpid()
    received: list[int] = []

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


def stop_children(timeout: float = 5.0) -> None:
    """Terminate processes this server started that are still alive (e.g. after an interrupted start)."""
    for child in multiprocessing.active_children():
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(timeout)
        if child.is_alive():
            child.kill()
