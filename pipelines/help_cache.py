"""Serve ``--help`` from a cache: building the parser imports torch, Lightning and the domain's
libraries (5-8 s on a small CPU), while the help text only changes with the code, the default
config, the package versions, the checkout's path (the help names its config file) or ``PIPELINES_*``
variables, which together form the cache key.

The first ``--help`` of a given state of the code runs the real parser and stores its output under
``$XDG_CACHE_HOME/domain-pipelines/help`` (``~/.cache`` by default); later ones print it in
milliseconds. Set ``PIPELINES_NO_HELP_CACHE=1`` to bypass it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from pipelines.files import write_text_atomic

HELP_FLAGS = ("-h", "--help")


def is_help_request(args: list[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in args) and not any(arg.startswith("--print_config") for arg in args)


def _cache_key(domain_dir: Path, args: list[str]) -> str:
    digest = hashlib.sha256("\0".join(args).encode())
    for folder in (Path(__file__).parent, domain_dir):  # where too: the help names the config file's path (trial finding: another checkout's)
        digest.update(str(folder.resolve()).encode())
        for path in sorted(folder.rglob("*")):
            if path.suffix in (".py", ".yaml") and path.is_file():
                digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    for package in ("lightning", "jsonargparse", "torch"):
        digest.update(metadata.version(package).encode())
    for name in sorted(os.environ):
        if name.startswith("PIPELINES_"):
            digest.update(f"{name}={os.environ[name]}".encode())
    return digest.hexdigest()[:24]


def cached_help(domain: str, domain_dir: Path, args: list[str], render: Callable[[], None]) -> None:
    """Print the help for ``args``, from the cache when possible; always exits like ``--help`` does."""
    if os.environ.get("PIPELINES_NO_HELP_CACHE"):
        render()
        return
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "domain-pipelines" / "help"
    path = root / f"{domain}-{_cache_key(domain_dir, args)}.txt"
    if path.is_file():
        sys.stdout.write(path.read_text())
        raise SystemExit(0)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            render()
    except SystemExit as done:
        sys.stdout.write(buffer.getvalue())
        if done.code in (0, None):
            with contextlib.suppress(OSError):
                write_text_atomic(path, buffer.getvalue())
        raise
    sys.stdout.write(buffer.getvalue())
