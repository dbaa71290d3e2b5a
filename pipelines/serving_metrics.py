"""Prometheus metrics of ``python -m pipelines.serve`` (prometheus-client in multiprocess mode).

LitServe answers HTTP in one or more forked processes and runs the model in spawned inference
workers, so every process writes its samples to files in one folder (``PROMETHEUS_MULTIPROC_DIR``,
a fresh temporary folder per server, removed when it stops) and ``GET /metrics`` adds them up::

    pipelines_serve_requests_total{code}            POST /predict requests answered, by HTTP status
    pipelines_serve_errors_total{code}              those answered with a status >= 400
    pipelines_serve_request_duration_seconds        POST /predict latency (histogram), arrival to last byte
    pipelines_serve_batch_size                      requests per inference batch (histogram)
    pipelines_serve_request_items                   items (samples, rows, sequences, images) per decoded request (histogram)
    pipelines_serve_in_flight_requests              POST /predict requests received and not yet answered (gauge)
    pipelines_serve_model_info{domain,name,version,format,checkpoint_sha256}   1 while a worker serves it, 0 after a swap
    pipelines_serve_requests_cut_total              requests cancelled unanswered when the drain timed out (--drain_timeout)
    pipelines_serve_model_reloads_total{result}     hot reloads of a registry alias: loaded, failed (a worker could not load), export_failed

:func:`enable_multiprocess` must run before any metric exists in the serving process.
"""

from __future__ import annotations

import asyncio
import functools
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "pipelines_serve_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ITEM_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def enable_multiprocess(directory: str | Path) -> None:
    """Make this process, and the processes it starts from now on, write their metrics to ``directory``."""
    os.environ[ENV] = str(directory)
    import prometheus_client.values as values

    values.ValueClass = values.get_value_class()  # chosen when prometheus_client was first imported


@dataclass(frozen=True)
class ServingMetrics:
    requests: Any
    errors: Any
    latency: Any
    batch_size: Any
    items: Any
    model_info: Any
    in_flight: Any
    reloads: Any
    cut: Any


@functools.cache
def metrics() -> ServingMetrics:
    """This process's metric objects (created once per process; forked children keep them)."""
    from prometheus_client import Counter, Gauge, Histogram

    return ServingMetrics(
        requests=Counter(PREFIX + "requests_total", "POST /predict requests answered, by HTTP status", ["code"]),
        errors=Counter(PREFIX + "errors_total", "POST /predict requests answered with an error status (>= 400), by status", ["code"]),
        latency=Histogram(PREFIX + "request_duration_seconds", "POST /predict latency, arrival to the last byte", buckets=LATENCY_BUCKETS),
        batch_size=Histogram(PREFIX + "batch_size", "requests per inference batch", buckets=BATCH_BUCKETS),
        items=Histogram(PREFIX + "request_items", "items (samples, rows, sequences, images) per decoded request", buckets=ITEM_BUCKETS),
        model_info=Gauge(
            PREFIX + "model_info", "the served model (value 1)", ["domain", "name", "version", "format", "checkpoint_sha256"],
            multiprocess_mode="max",
        ),  # fmt: skip
        in_flight=Gauge(PREFIX + "in_flight_requests", "POST /predict requests received and not yet answered", multiprocess_mode="livesum"),
        reloads=Counter(PREFIX + "model_reloads_total", "hot reloads of the served model by the inference workers", ["result"]),
        cut=Counter(PREFIX + "requests_cut_total", "POST /predict requests cancelled unanswered when the drain timed out"),
    )


def set_model_info(loaded: Any, served: bool = True) -> None:
    """``pipelines_serve_model_info`` of a loaded model (:class:`pipelines.serving_registry.Loaded`): 1 while served, 0 after."""
    meta = loaded.bundle.metadata
    metrics().model_info.labels(domain=meta["domain"], format=meta["format"], **loaded.identity).set(1 if served else 0)


T = TypeVar("T")

#: what reading the processes' metric files raises while a process creates one (prometheus/client_python#1199: the file
#: exists at 0 bytes until it is sized) or removes one: the read is tried again
TORN_READ = (struct.error, RuntimeError, UnicodeDecodeError, FileNotFoundError)


class _WrittenFiles:
    """prometheus_client's ``MultiProcessCollector`` over the metric files that hold something: a file of 0 bytes is one
    a process has created and not sized yet, or left so when it was killed (no values either way), and would fail the
    whole read (prometheus/client_python#1199)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Any:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = [file for file in Path(self.path).glob("*.db") if file.stat().st_size > 0]
        return MultiProcessCollector.merge([str(file) for file in files], accumulate=True)


def _read_all(read: Callable[[Any], T], attempts: int = 5) -> T:
    """``read(registry)`` over every process's metric files, tried again (``attempts`` times, 10 ms apart) when a file
    is caught half-written or removed (a worker starting, reloading its model, or stopping); the last failure is raised."""
    from prometheus_client import CollectorRegistry

    path = os.environ.get(ENV)
    if not path or not os.path.isdir(path):
        raise ValueError(f"{ENV} is not set or not a folder: the server sets it before its workers start")
    for _ in range(attempts - 1):
        registry = CollectorRegistry()
        registry.register(_WrittenFiles(path))
        try:
            return read(registry)
        except TORN_READ:
            time.sleep(0.01)
    registry = CollectorRegistry()
    registry.register(_WrittenFiles(path))
    return read(registry)  # the last try: its failure is raised


def total(name: str) -> float:
    """The sum over every process of the samples of metric ``PREFIX + name`` (e.g. ``requests_cut_total``)."""
    return _read_all(lambda registry: sum(s.value for family in registry.collect() for s in family.samples if s.name == PREFIX + name))


def render() -> tuple[bytes, str]:
    """The text exposition of every process's metrics, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return _read_all(generate_latest), CONTENT_TYPE_LATEST


class PredictMetricsMiddleware:
    """ASGI middleware on ``POST <path>``: counts answers by status, times them, and adds the model's headers.

    Outermost of the app's middleware, so it sees the 413s of the payload limit and the 500s of
    unhandled exceptions too.
    """

    def __init__(self, app: Any, path: str, headers: Callable[[], dict[str, str]]) -> None:
        self.app = app
        self.path = path
        self._headers = headers

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The model headers of the published model (answers made outside the inference workers: 413, 422 of the body)."""
        return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self._headers().items()]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        found = metrics()
        found.in_flight.inc()

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers() if k not in present]  # the worker's answer names the model that made it
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except asyncio.CancelledError:  # uvicorn cancels what is still running when --drain_timeout passes
            found.cut.inc()
            raise
        finally:
            found.in_flight.dec()
            code = str(status[0])
            found.requests.labels(code=code).inc()
            if status[0] >= 400:
                found.errors.labels(code=code).inc()
            found.latency.observe(time.perf_counter() - started)
