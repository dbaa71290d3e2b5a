"""``python -m pipelines.monitor_live URL [--interval 30] [--json OUT] [--wandb]``: a running server's live numbers, from its ``/metrics``.

Reads ``URL/metrics`` (the Prometheus text format of ``python -m pipelines.serve``, :mod:`pipelines.serving_metrics`,
parsed with ``prometheus_client.parser``) twice, ``--interval`` seconds apart, and reports what happened between the two
reads, as Prometheus' own ``rate()`` and ``histogram_quantile()`` would:

- ``serving/request_rate``: ``POST /predict`` answers per second (every status);
- ``serving/error_rate``: the share of those answered with a status >= 400 (absent when nothing was answered);
- ``serving/latency_p50``, ``serving/latency_p95``, ``serving/latency_p99``: latency quantiles in seconds, linear within
  the histogram's buckets (absent when nothing was answered; a quantile in the last, open bucket is its lower edge);
- ``serving/in_flight``: requests received and not yet answered at the second read.

A counter that went down between the reads means the server restarted: the second read's totals are
then the interval's (as ``rate()`` treats a reset). With ``--wandb`` the numbers are logged as a W&B run of the
served model's domain (group ``monitor-<domain>``, :func:`pipelines.monitor_wandb.log_to_wandb`, offline unless a key is
present): the dashboard's "Serving metrics" panels name them (:mod:`pipelines.dashboard`). Exit status: 0 read, 2 bad
input (a URL that does not answer, or answers something that is not the server's metrics), refused in one paragraph.
"""

from __future__ import annotations

import math
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import EXIT_BAD_INPUT, InputError, paragraph
from pipelines.option_spelling import OptionParser
from pipelines.serving_metrics import PREFIX

LIVE_KEYS = ("serving/request_rate", "serving/error_rate", "serving/latency_p50", "serving/latency_p95", "serving/latency_p99", "serving/in_flight")
QUANTILES = {"serving/latency_p50": 0.5, "serving/latency_p95": 0.95, "serving/latency_p99": 0.99}


@dataclass(frozen=True)
class Reading:
    """One read of ``/metrics``: the totals this module needs."""

    at: float
    requests: float
    errors: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending; the last is +Inf
    in_flight: float
    domain: str | None


def parse(text: str, at: float, source: str) -> Reading:
    """The totals of one ``/metrics`` text; :class:`InputError` naming ``source`` when it is not the server's metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"requests": 0.0, "errors": 0.0, "in_flight": 0.0}
    buckets: dict[float, float] = {}
    domain, found = None, False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == PREFIX + "requests_total":
                    totals["requests"] += sample.value
                    found = True
                elif sample.name == PREFIX + "errors_total":
                    totals["errors"] += sample.value
                elif sample.name == PREFIX + "request_duration_seconds_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
                elif sample.name == PREFIX + "in_flight_requests":
                    totals["in_flight"] += sample.value
                elif sample.name == PREFIX + "model_info" and sample.value == 1:
                    domain = sample.labels.get("domain")
    except ValueError as error:
        raise InputError(f"{source}: not the Prometheus text format ({error})") from None
    if not found and not buckets:
        raise InputError(f"{source}: no {PREFIX}requests_total or {PREFIX}request_duration_seconds; expected the /metrics of python -m pipelines.serve")
    return Reading(at, totals["requests"], totals["errors"], tuple(sorted(buckets.items())), totals["in_flight"], domain)


def read(url: str, timeout: float = 10.0) -> Reading:
    """``GET URL/metrics`` parsed; :class:`InputError` when it does not answer with the server's metrics."""
    target = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise InputError(f"{target}: no answer ({getattr(error, 'reason', error)}); expected a running python -m pipelines.serve") from None
    return parse(text, time.monotonic(), target)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: the ``q`` quantile of cumulative ``buckets``, linear within its bucket."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower  # the open last bucket: its lower edge
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def live_metrics(before: Reading, after: Reading) -> dict[str, float]:
    """What happened between two readings (module docstring)."""
    reset = after.requests < before.requests or any(a[1] < b[1] for a, b in zip(after.buckets, before.buckets))
    base = Reading(before.at, 0.0, 0.0, tuple((b, 0.0) for b, _ in after.buckets), 0.0, None) if reset else before
    seconds = max(after.at - base.at, 1e-9)
    requests, errors = after.requests - base.requests, after.errors - base.errors
    metrics = {"serving/request_rate": requests / seconds, "serving/in_flight": after.in_flight}
    if requests > 0:
        metrics["serving/error_rate"] = errors / requests
        counts = dict(base.buckets)
        delta = [(bound, count - counts.get(bound, 0.0)) for bound, count in after.buckets]
        for key, q in QUANTILES.items():
            value = histogram_quantile(q, delta)
            if value is not None:
                metrics[key] = value
    return metrics


def main(argv: list[str] | None = None) -> int:
    from pipelines.files import report_destination_problem, write_json_atomic
    from pipelines.monitor_wandb import log_to_wandb

    parser = OptionParser(prog="python -m pipelines.monitor_live", description=__doc__.splitlines()[0].strip("`. "))
    parser.add_argument("url", help="the server's address, e.g. http://127.0.0.1:8000")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between the two reads of /metrics")
    parser.add_argument("--json", default=None, help="write the numbers here as JSON (complete or absent)")
    parser.add_argument("--wandb", action="store_true", help="log them to W&B as a run of the served model's domain")
    args = parser.parse_args(argv)
    if not args.interval > 0:
        parser.error(f"--interval must be > 0 seconds, got {args.interval}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: the folder {Path(args.json).resolve().parent} does not exist")
    problem = report_destination_problem(Path(args.json), "--json", "interval_s") if args.json else None
    if problem:
        parser.error(problem)
    try:
        before = read(args.url)
        time.sleep(args.interval)
        after = read(args.url)
    except InputError as error:
        print(paragraph(str(error)), file=sys.stderr)
        return EXIT_BAD_INPUT
    metrics = live_metrics(before, after)
    for key, value in metrics.items():
        print(f"{key} {value:.6g}")
    facts: dict[str, Any] = {"url": args.url, "interval_s": round(after.at - before.at, 3), "domain": after.domain, "logged": metrics}
    if args.wandb:
        print(f"[pipelines] {log_to_wandb(metrics, after.domain or 'monitor', {k: v for k, v in facts.items() if k != 'logged'})}")
    if args.json:
        write_json_atomic(Path(args.json), facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
