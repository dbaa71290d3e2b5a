"""Cache folders for data larger than memory, shared by every domain's ``--data.streaming true``.

- :func:`default_cache`: ``$XDG_CACHE_HOME/domain-pipelines/<domain>`` (``~/.cache`` by default).
- :func:`digest_of`: a short stable digest of a JSON-able key (what a cache folder is named by).
- :func:`building`: a folder written under a temporary name and renamed when complete, so a cache is
  complete or absent; two processes (DDP ranks) building the same folder race harmlessly (each builds
  its own temporary folder; the first rename wins, the other's copy is dropped). The temporary name
  holds the host and process id, and a build removes what killed builders on this host left.
- :func:`file_manifest` / :func:`manifest_problem`: every cache file's size and SHA-256, written with the
  cache and checked whenever it is opened: a damaged cache is named, removed and rebuilt, never used.
- :func:`usable`: whether a cache folder is complete and matches its manifest (a damaged one is named in the
  caller's log, removed and reported unusable, to be rebuilt); :func:`size_mib`: a folder's size for the log.
- :func:`check_cache_dir`: ``--data.cache_dir`` refused before anything is read or written.
- :func:`map_array` / :func:`release`: read-only memory maps of cache files whose resident pages can
  be handed back to the kernel's page cache (``madvise(MADV_DONTNEED)``), so serving batches from a
  file larger than memory keeps the process's resident memory flat.

Imports nothing heavy (numpy only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import InputError

#: the file a completed cache folder holds (written last, inside the temporary folder)
COMPLETE = "meta.json"


def default_cache(domain: str) -> Path:
    """``$XDG_CACHE_HOME/domain-pipelines/<domain>`` (``~/.cache`` by default), beside ``pipelines.help_cache``'s ``help``."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "domain-pipelines" / domain


def digest_of(value: Any) -> str:
    """20 hex digits of the SHA-256 of ``value`` as canonical JSON.

    >>> digest_of({"b": 1, "a": [2]}) == digest_of({"a": [2], "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


PARTIAL = ".partial-"


def _host() -> str:
    """This host's name as a temporary folder names it (no ``-``, which separates the name's fields)."""
    return socket.gethostname().replace("-", "_") or "host"


def partial_name(final: Path) -> Path:
    """The temporary folder :func:`building` writes ``final`` into: hidden, and naming the host and process that
    build it (``.NAME.partial-HOST-PID-RANDOM``), so that a later build can tell a killed builder's leftovers."""
    return final.with_name(f".{final.name}{PARTIAL}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def stale_partials(folder: Path) -> list[Path]:
    """The temporary folders in ``folder`` that a builder on this host left when it was killed (its process is gone).
    A builder still running, one on another host (a shared file system) or one of an unknown name is left alone.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> live = partial_name(folder / "cache"); live.mkdir()
    >>> dead = folder / f".cache{PARTIAL}{_host()}-999999999-0a1b2c3d"; dead.mkdir()
    >>> [p.name == dead.name for p in stale_partials(folder)]
    [True]
    """
    host = _host()
    stale = []
    for path in folder.glob(f".*{PARTIAL}*") if folder.is_dir() else ():
        owner, _, _ = path.name.rpartition(PARTIAL)[2].rpartition("-")
        owner_host, _, pid = owner.rpartition("-")
        if owner_host != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.append(path)
        except (PermissionError, OverflowError):
            continue  # alive under another user / not a pid
    return stale


def sweep_stale_partials(folder: Path) -> None:
    """Remove what killed builders left in a cache folder (:func:`stale_partials`), naming it on the log."""
    for path in stale_partials(folder):
        size = size_mib(path)
        discard(path)
        logging.getLogger(__name__).warning(f"removed {path} ({size} MiB): a cache build killed before it completed left it")


@contextmanager
def building(final: Path, option: str = "--data.cache_dir") -> Iterator[Path]:
    """A temporary folder beside ``final`` (:func:`partial_name`), renamed to ``final`` when the block completes;
    removed on any error (a kill leaves a ``.partial-`` folder, never a half ``final``, and the next build in that
    folder removes it: :func:`sweep_stale_partials`). When another process completed ``final`` meanwhile, its copy is kept."""
    sweep_stale_partials(final.parent)
    partial = partial_name(final)
    try:
        partial.mkdir(parents=True)
    except OSError as error:
        raise InputError(f"{option} {final.parent}: cannot create the cache there: {error.strerror}") from None
    try:
        yield partial
        try:
            os.replace(partial, final)
        except OSError:
            if not (final / COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def counted_per_chunk(option: str, rows: int) -> Iterator[None]:
    """Refusals raised while a file is read in chunks say that their counts are of the chunk that failed: a streamed
    read stops at the first chunk with a problem, where reading the whole file counts every row (so "12 tracks" there
    may be "20 tracks" read whole).

    >>> with counted_per_chunk("--data.chunk_rows", 500):
    ...     raise InputError("t.csv: 12 track(s) are at another rate")
    Traceback (most recent call last):
    ...
    pipelines.errors.InputError: t.csv: 12 track(s) are at another rate (read in chunks of --data.chunk_rows 500 rows: the counts are of the first chunk refused; later rows were not read)
    """
    try:
        yield
    except InputError as error:
        raise InputError(f"{error} (read in chunks of {option} {rows} rows: the counts are of the first chunk refused; later rows were not read)") from None


def discard(folder: Path) -> None:
    """Remove a damaged cache folder: renamed out of the way first (readers never see it half-removed)."""
    doomed = folder.with_name(f".{folder.name}.damaged-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(folder, doomed)
    except OSError:
        return  # gone already (another process discarded it)
    shutil.rmtree(doomed, ignore_errors=True)


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file directly in ``folder`` but ``meta.json`` (written into the meta when the
    cache is built, checked by :func:`manifest_problem` whenever it is opened)."""
    from pipelines.files import sha256_file

    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE}


def manifest_problem(folder: Path, manifest: dict[str, dict[str, Any]] | None) -> str | None:
    """What is wrong with the files of a cache folder against its manifest: missing, cut short or grown, or changed
    (another tool writing there, a copy cut short, a disk error); None when every file is as it was written."""
    from pipelines.files import sha256_file

    if not manifest:
        return "its meta.json lists no files to check"
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} holds {path.stat().st_size} bytes, expected {expected['bytes']}"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} changed since it was written (its SHA-256 differs)"
    return None


def usable(folder: Path, log: logging.Logger) -> bool:
    """Whether a cache folder is complete and every file is as its manifest says; a damaged one is named (a warning
    in ``log``, the caller's), removed (to be rebuilt) and reported as not usable, never read."""
    meta = folder / COMPLETE
    if not meta.is_file():
        return False
    try:
        problem = manifest_problem(folder, json.loads(meta.read_text()).get("files"))
    except (OSError, ValueError) as error:
        problem = f"unreadable meta.json ({error})"
    if problem is None:
        return True
    log.warning(f"streaming cache {folder} is damaged ({problem}): removed and rebuilt")
    discard(folder)
    return False


def size_mib(folder: Path) -> int:
    """The size of every file under ``folder``, in MiB (rounded)."""
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20)


def check_cache_dir(cache_dir: str | None, streaming: bool) -> None:
    """``--data.cache_dir`` without ``--data.streaming true``, or naming a file: :class:`InputError`."""
    if cache_dir is not None and not streaming:
        raise InputError(f"--data.cache_dir {cache_dir}: the cache is written by --data.streaming true; add it, or drop --data.cache_dir")
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise InputError(f"--data.cache_dir {cache_dir}: is a file; expected a folder (created if absent) for the streaming cache")


def map_array(path: Path, dtype: Any, tail: tuple[int, ...] = ()) -> tuple[mmap.mmap | None, np.ndarray]:
    """A read-only map of ``path`` as an array of ``dtype`` shaped ``(-1, *tail)`` and the map itself (``None`` for an
    empty file, which cannot be mapped: an empty array is returned)."""
    if path.stat().st_size == 0:
        return None, np.zeros((0, *tail), dtype=dtype)
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return mapped, np.frombuffer(mapped, dtype=dtype).reshape(-1, *tail)


def release(maps: Iterable[mmap.mmap | None]) -> None:
    """Hand the resident pages of ``maps`` back to the page cache (the data stays valid; a later read is a minor fault)."""
    for mapped in maps:
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)
