"""The command line of ``python -m pipelines.serve`` (options and their checks; see :mod:`pipelines.serve`)."""

from __future__ import annotations

import argparse

from pipelines.domain_registry import available_domains, get_domain
from pipelines.option_spelling import OptionParser
from pipelines.validation import check_model_label


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = OptionParser(prog="python -m pipelines.serve", description=description)
    parser.add_argument("domain", help=f"registered domain ({', '.join(available_domains())})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", help="bundle folder written by `python -m pipelines.run DOMAIN export`")
    source.add_argument("--registry", help="model registry folder (`python -m pipelines.retrain`): serve --alias's version, reloading when it moves")
    parser.add_argument("--alias", default="champion", help="with --registry: the alias (or version) to serve (default: champion)")
    parser.add_argument("--reload_interval", type=float, default=2.0, help="with --registry: seconds between looks at the alias (SIGHUP: look now)")
    parser.add_argument("--bundle_cache", default=None, help="with --registry: folder for the exported bundles (default: a temporary folder, removed at exit)")
    parser.add_argument("--export_format", default="onnx", choices=["onnx", "torchscript"], help="with --registry: the bundles' format")
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"], help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch_size", type=int, default=16, help="most requests run as one batch")
    parser.add_argument("--batch_timeout", type=float, default=0.01, help="seconds to wait for more requests before running a batch")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait for an answer before a 504")
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    parser.add_argument("--max_payload_mb", type=float, default=16.0, help="largest request body; larger ones get a 413")
    parser.add_argument("--max_items", type=int, default=1000, help="most items (samples, rows, sequences, images) in one request; more get a 413")
    parser.add_argument("--drain_delay", type=float, default=0.0, help="seconds to keep serving after SIGTERM with /readyz at 503")
    parser.add_argument("--drain_timeout", type=float, default=30.0, help="seconds to wait for the requests in flight once draining")
    parser.add_argument("--model_name", default=None, help="name in /info, X-Model-Name and metrics (default: the bundle's, else the domain)")
    parser.add_argument("--model_version", default=None, help="version (default: the registry version; the bundle's; else sha256-<checkpoint sha256 prefix>)")
    parser.add_argument("--request_log", default=None, help="append what the model saw and answered to this JSON-lines file, or Parquet segments for a .parquet name (pipelines.request_log)")
    parser.add_argument("--request_log_max_mb", type=float, default=64.0, help="rotate the request log when it would pass this size")
    parser.add_argument("--request_log_keep", type=int, default=5, help="rotated request logs kept (PATH.1 .. PATH.N)")
    parser.add_argument("--request_log_sample", type=float, default=1.0, help="share of requests logged, in (0, 1]")
    parser.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        get_domain(args.domain)
    except ValueError as error:
        parser.error(str(error))
    if not 1024 <= args.port <= 65535:
        parser.error(f"--port must be in 1024..65535, got {args.port}")
    if min(args.max_batch_size, args.workers, args.max_items) < 1 or min(args.batch_timeout, args.drain_delay) < 0 or min(args.timeout, args.max_payload_mb, args.drain_timeout) <= 0:
        parser.error("--max_batch_size, --workers and --max_items must be >= 1, --batch_timeout and --drain_delay >= 0, "
                     "--timeout, --max_payload_mb and --drain_timeout > 0")  # fmt: skip
    if args.reload_interval <= 0:
        parser.error(f"--reload_interval must be > 0, got {args.reload_interval}")
    if args.bundle and args.bundle_cache:
        parser.error("--bundle_cache goes with --registry (a --bundle is served as it is)")
    if args.request_log_max_mb <= 0 or args.request_log_keep < 1 or not 0 < args.request_log_sample <= 1:
        parser.error(f"--request_log_max_mb must be > 0, --request_log_keep >= 1, --request_log_sample in (0, 1]; "
                     f"got {args.request_log_max_mb}, {args.request_log_keep}, {args.request_log_sample}")  # fmt: skip
    if args.request_log and not args.request_log.endswith((".jsonl", ".parquet")):
        parser.error(f"--request_log {args.request_log}: expected a .jsonl (JSON lines) or .parquet (Parquet segments) name")
    if args.registry and args.model_version:
        parser.error("--model_version goes with --bundle: with --registry the version is the registry's (it changes on reload)")
    try:
        check_model_label(args.model_name, "--model_name")
        check_model_label(args.model_version, "--model_version")
    except ValueError as error:
        parser.error(str(error))
