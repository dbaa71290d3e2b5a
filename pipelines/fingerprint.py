"""The fingerprint of a run's data: content hashes of the files and folders a config names, plus
the resolved ``data`` and ``model`` sections (what makes two trainings the same training).

Imports nothing heavy (no torch, no Lightning): retraining fingerprints before it trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from pipelines.files import sha256_file


def path_values(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in path_values(v)]
    if isinstance(value, list):
        return [p for v in value for p in path_values(v)]
    if isinstance(value, str) and value and len(value) < 4096 and "\n" not in value:
        with contextlib.suppress(OSError, ValueError):
            if Path(value).exists():
                return [value]
    return []


def absolute_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: absolute_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [absolute_paths(v) for v in value]
    return str(Path(value).resolve()) if path_values(value) else value


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a folder (every file's relative path and content, in sorted order)."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode() + b"\0" + sha256_file(item).encode())
    return digest.hexdigest()


def changed_files(files: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(path, expected sha256, found)`` of each file or folder of ``files`` (path -> :func:`hash_path`) whose content is not
    the recorded one; ``found`` is ``"missing"`` for a path that is gone."""
    changed = []
    for path, expected in files.items():
        found = hash_path(Path(path)) if Path(path).exists() else "missing"
        if found != expected:
            changed.append((path, expected, found))
    return changed


def fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """Fingerprint of the training data: content hashes of the files/folders the ``data`` and
    ``model`` values point at, plus the resolved ``data`` and ``model`` sections themselves.

    Example:
        >>> a = fingerprint({"data": {"synthetic_seed": 0}, "model": {"lr": 0.1}})
        >>> b = fingerprint({"data": {"synthetic_seed": 1}, "model": {"lr": 0.1}})
        >>> a["digest"] != b["digest"], a["files"]
        (True, {})
    """
    sections = {"data": config.get("data"), "model": config.get("model")}
    files = {value: hash_path(Path(value)) for value in sorted(set(path_values(sections)))}
    canonical = json.dumps({"config": sections, "files": files}, sort_keys=True, default=str)
    return {"digest": hashlib.sha256(canonical.encode()).hexdigest(), "files": files}
