"""Files that are complete or absent: written under a temporary name, then renamed (``os.replace``).

The lowest layer of ``pipelines``: imports nothing of the project, so every module (and every
domain) can write its outputs through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def destination_problem(path: Path, option: str, folder: bool = False) -> str | None:
    """Why an output at ``path`` (a file, or a ``folder`` to write into) could not be written, or
    ``None``: the check a command makes before doing any work, so that a bad destination is refused
    at once instead of after the work (and without a traceback). Nothing is left behind: the
    nearest existing folder is probed with a temporary file, which is removed.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     print(destination_problem(Path(tmp) / "out.json", "--json"), destination_problem(Path(tmp), "--json") is not None)
    None True
    """
    path = Path(path)
    if path.exists() and not folder and path.is_dir():
        return f"{option} {path}: is a folder; expected the name of a file to write"
    if path.exists() and folder and not path.is_dir():
        return f"{option} {path}: is a file; expected a folder to write into"
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{option} {path}: {existing} is a file, so nothing can be written under it"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as error:
        return f"{option} {path}: cannot write in {existing} ({error.strerror or error})"
    return None


def report_destination_problem(path: Path, option: str, report_key: str, inputs: tuple[str | Path, ...] = ()) -> str | None:
    """Why a JSON report may not be written at ``path``, or ``None``. A report path is rewritten on
    every run (a nightly check writes the same ``--json``), so an existing file is replaced only when
    it is an earlier report of the same command (a JSON object with ``report_key``): never one of the
    command's ``inputs`` (the request log or table it reads) or any other file, which would be lost.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     table = Path(tmp) / "window.csv"
    ...     _ = table.write_text("a,b\\n1,2\\n")
    ...     print(report_destination_problem(table, "--json", "verdict", (table,)))
    --json ...window.csv: is an input of this command (...window.csv); writing the report there would replace it: choose another path
    """
    path = Path(path)
    problem = destination_problem(path, option)
    if problem or not path.exists():
        return problem
    for source in inputs:
        if Path(source).exists() and os.path.samefile(path, source):
            return f"{option} {path}: is an input of this command ({source}); writing the report there would replace it: choose another path"
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or report_key not in earlier:
        return f"{option} {path}: exists and is not an earlier report of this command (no {report_key!r} key); it would be replaced: choose another path or remove it"
    return None


def write_text_atomic(path: Path, text: str, durable: bool = False) -> None:
    """Write a file so that readers see the old file or the new one, never half of one.

    Args:
        path: the file to replace (its folder is created).
        text: the new content.
        durable: also fsync the temporary file before ``os.replace`` and the folder after it, so
            the new file survives a power loss (the model registry's pointers), not only a kill.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)  # fails (and the temporary file goes) when ``path`` is a folder
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, payload: Any, durable: bool = False) -> None:
    """Write JSON atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n", durable)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary path)`` in ``path``'s folder, then ``os.replace``: complete or absent
    (for writers that take a path: safetensors, numpy, a figure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # named before it exists (mkstemp's way, 0600, exclusive): a SIGTERM (SystemExit) that lands inside ``mkstemp``, after
    # it made the file and before it returned the name, left the file behind (monitor --recalibrate_budget's stop test)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another writer's name (48 random bits): not ours to remove
        raise
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:
        os.close(descriptor)
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
