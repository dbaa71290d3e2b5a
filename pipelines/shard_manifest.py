"""A shard folder's ``manifest.json`` carries a checksum of its own content, ``manifest_sha256``, checked when it is read.

The manifest is what a run from shards trusts: which shards a split has, their sample counts, sizes and SHA-256s, and
the fitted state (statistics, classes) a run takes as a checkpoint's. An edited manifest (a statistic changed by hand,
a shard's count or SHA-256 "fixed" to match a changed shard) was read as written. :func:`sealed` adds the SHA-256 of the
manifest's content without that key (canonical JSON: keys sorted, no spaces, so indentation and key order do not
matter); :func:`check_sealed` refuses a manifest whose content no longer matches it, naming the file. A manifest
written before this key existed has none and reads as before.

Example:
    >>> manifest = sealed({"format": 1, "splits": {"train": [{"file": "train-000000.tar", "samples": 3}]}})
    >>> check_sealed(manifest, "set/manifest.json", "--data.shards set")
    >>> manifest["splits"]["train"][0]["samples"] = 4
    >>> check_sealed(manifest, "set/manifest.json", "--data.shards set")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipelines.errors.InputError: --data.shards set: set/manifest.json was changed after the shard writer wrote it: its content does not match its manifest_sha256 (...)...
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipelines.errors import InputError

KEY = "manifest_sha256"


def content_sha256(manifest: dict[str, Any]) -> str:
    """The SHA-256 of a manifest's content without :data:`KEY`, as canonical JSON."""
    body = {key: value for key, value in manifest.items() if key != KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=float).encode()).hexdigest()


def sealed(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` as JSON will read it back (numpy numbers as floats), with its :data:`KEY`."""
    plain = json.loads(json.dumps({key: value for key, value in manifest.items() if key != KEY}, default=float))
    return {**plain, KEY: content_sha256(plain)}


def check_sealed(manifest: dict[str, Any], path: str | Path, where: str) -> None:
    """Refuse (:class:`InputError`) a manifest whose content does not match its :data:`KEY`; one without it (written
    before the key existed) passes."""
    if KEY not in manifest:
        return
    recorded, actual = manifest[KEY], content_sha256(manifest)
    if recorded != actual:
        raise InputError(
            f"{where}: {path} was changed after the shard writer wrote it: its content does not match its {KEY} "
            f"({str(recorded)[:16]}... recorded, {actual[:16]}... now). The manifest says which shards, sample counts, SHA-256s "
            "and fitted statistics to trust, so an edited one is not used; write the shards again with the domain's shard writer "
            "(python -m domains.DOMAIN.shards_write) instead of editing it"
        )
