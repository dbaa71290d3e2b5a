"""Verifying and loading a registry version without trusting its files (mixed into :class:`pipelines.model_registry.ModelRegistry`).

Weights come from safetensors, the rest of the checkpoint from ``torch.load(weights_only=True)``,
after :meth:`verify_version` checked every file against ``SHA256SUMS``; the model class is the
registered domain's own, never one imported from a name written in a file.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from pipelines.files import sha256_file

WEIGHTS_FILE = "model.safetensors"
EXTRAS_FILE = "checkpoint_extras.pt"
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "SHA256SUMS"
HISTORY_FILE = "history.jsonl"
#: the champion pointer's name; other aliases are free-form lowercase names
CHAMPION = "champion"
EVALUATION_FILE = "evaluation.json"


#: how ``evaluation.json`` names a file inside the registry's domain folder, so that a registry moved or mounted
#: elsewhere (a Kubernetes volume at another path, a copied backup) still finds its evaluation snapshot
REGISTRY_PREFIX = "@registry/"
SNAPSHOT_FOLDER = "evaluation"


class RegistryError(RuntimeError):
    """A registry folder or request that is not what was expected (the message names the path)."""


def _map_strings(value: Any, change: Any) -> Any:
    """``value`` with every string (dict keys included) passed through ``change``."""
    if isinstance(value, dict):
        return {change(k) if isinstance(k, str) else k: _map_strings(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, change) for v in value]
    return change(value) if isinstance(value, str) else value


def pin_relative(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """An evaluation record with every absolute path inside the registry's domain ``folder`` written as
    ``@registry/<path inside it>`` (what ``evaluation.json`` stores); other values unchanged (``source``: the user's files)."""
    roots = {folder.absolute(), folder.resolve()}

    def change(text: str) -> str:
        if not text.startswith("/"):
            return text
        for root in roots:
            with contextlib.suppress(ValueError):
                return REGISTRY_PREFIX + Path(text).relative_to(root).as_posix()
        return text

    return {k: v if k == "source" else _map_strings(v, change) for k, v in record.items()}


def pin_absolute(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The evaluation record ``evaluation.json`` holds, with its paths where this registry is now: ``@registry/...``
    inside the domain ``folder``; a legacy absolute path into a registry's ``evaluation/`` snapshots that no
    longer exists (the registry was moved) is looked up in this registry's own snapshots; others as they are."""
    base = folder.absolute()

    def change(text: str) -> str:
        if text.startswith(REGISTRY_PREFIX):
            return str(base / text[len(REGISTRY_PREFIX):])
        marker = f"/{folder.name}/{SNAPSHOT_FOLDER}/"
        if text.startswith("/") and marker in text and not Path(text).exists():
            moved = base / SNAPSHOT_FOLDER / text.rpartition(marker)[2]
            if moved.exists():
                return str(moved)
        return text

    return {k: v if k == "source" else _map_strings(v, change) for k, v in record.items()}


def read_history(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a history file and its damaged lines (described with the file and line number).

    Each row is appended whole with its newline (``ModelRegistry.append_history``), so the only line
    that may be unfinished is a last one without a newline: a write cut by a kill, never a record, so
    it is left out without being damage (the next append records and removes it). Any other line that
    is not a JSON object is damage: leaving it out would forget an attempt (a version name could be
    reused, a rejected model retrained, a recorded version taken for an orphan).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "history.jsonl"
        >>> _ = path.write_bytes(b'{"decision": "promoted"}\\nnot json\\n{"decision": "rej')
        >>> rows, damage = read_history(path)
        >>> rows, [text.split(": ", 1)[1] for text in damage]
        ([{'decision': 'promoted'}], ["line 2 is not a JSON object ('not json')"])
    """
    if not path.is_file():
        return [], []
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the file ends with a newline: every line is finished
    cut = not data.endswith(b"\n") and bool(data)
    rows, damage = [], []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif not (cut and number == len(lines)):
            damage.append(f"{path}: line {number} is not a JSON object ({raw[:60].decode(errors='replace')!r})")
    return rows, damage


class LoadingMixin:
    """``verify_version``, ``verify``, ``load_weights``, ``load_checkpoint``, ``write_checkpoint``, ``load_model``."""

    domain: str
    path: Path
    versions_dir: Path

    def verify_version(self, version: str) -> dict[str, Any]:
        """Check every file of a version (metadata included) against ``SHA256SUMS``; return the metadata."""
        folder = self.version_dir(version)
        manifest = folder / MANIFEST_FILE
        if not manifest.is_file():
            return self._verify_legacy(version)
        for line in manifest.read_text().splitlines():
            expected, _, name = line.partition("  ")
            path = folder / name
            if "/" in name or not path.is_file():
                raise RegistryError(f"{path} is missing (listed in {manifest})")
            if sha256_file(path) != expected:
                raise RegistryError(f"{path} does not match its sha256 in {manifest}: the file changed or is corrupt")
        if f"  {METADATA_FILE}" not in manifest.read_text():
            raise RegistryError(f"{manifest} does not cover {METADATA_FILE}")
        return self.metadata(version)

    def _verify_legacy(self, version: str) -> dict[str, Any]:
        """A version written before ``SHA256SUMS`` existed: its files against the sha256 in its
        metadata (which nothing covers; loading never trusts a class name from it anyway)."""
        folder, metadata = self.version_dir(version), self.metadata(version)
        if not metadata.get("files"):
            raise RegistryError(f"{folder / MANIFEST_FILE} is missing: the version cannot be verified")
        for name, expected in metadata["files"].items():
            if "/" in name or not (folder / name).is_file() or sha256_file(folder / name) != expected:
                raise RegistryError(f"{folder / name} is missing or does not match its sha256 in {folder / METADATA_FILE}")
        return metadata

    def verify(self) -> list[str]:
        """Problems with the registry (an empty list when it is valid): every pointer names a
        complete version whose files match their checksums, the history parses."""
        problems = []
        pointers: dict[str, str | None] = {CHAMPION: None, **self.aliases()}
        with contextlib.suppress(RegistryError):
            chain = self.rollback_chain()  # type: ignore[attr-defined]
            pointers[CHAMPION] = chain[0] if chain else None
            pointers.update({f"rollback target {i} (previous champion)": version for i, version in enumerate(chain[1:], 1)})
        for name, version in pointers.items():
            try:
                if version is not None:
                    self.verify_version(version)
            except RegistryError as error:
                problems.append(f"{name}: {error}")
        for version in self.versions():
            if not (self.versions_dir / version / MANIFEST_FILE).is_file() and not self.metadata(version).get("files"):
                problems.append(f"{self.versions_dir / version} has no {MANIFEST_FILE}")
        problems.extend(self._evaluation_pin_problems())
        problems.extend(read_history(self.path / HISTORY_FILE)[1])
        return problems


    def _evaluation_pin_problems(self) -> list[str]:
        """The pinned evaluation set (``evaluation.json``): it parses, and each snapshot file it pins has its checksum."""
        from pipelines.fingerprint import changed_files

        path = self.path / EVALUATION_FILE
        if not path.is_file():
            return []
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            return [f"evaluation pin: {path} is not valid JSON ({error}); every retrain would fail: replace it with `registry {self.domain} repin`"]
        record = pin_absolute(record, self.path) if isinstance(record, dict) else record
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, dict) or "data" not in record:
            return [f"evaluation pin: {path} has no 'data' and 'files' (the pinned set and its checksums); replace it with `registry {self.domain} repin`"]
        return [
            f"evaluation pin: {name} (pinned in {path}) is {'missing' if actual == 'missing' else 'changed or damaged'} "
            f"(sha256 {str(expected)[:12]} expected, found {actual[:12]})"
            for name, expected, actual in changed_files(files)
        ]  # fmt: skip

    def load_weights(self, version: str | None = None) -> dict[str, Any]:
        """The LightningModule ``state_dict`` of a version (default: the champion), from safetensors."""
        from safetensors.torch import load_file

        version = self.resolve(version)
        self.verify_version(version)
        return load_file(str(self.version_dir(version) / WEIGHTS_FILE))

    def load_checkpoint(self, version: str | None = None) -> dict[str, Any]:
        """A Lightning checkpoint dict of a version (weights + hyper-parameters + data module state),
        read without unpickling code: safetensors and ``torch.load(weights_only=True)``."""
        import torch

        version = self.resolve(version)
        weights = self.load_weights(version)
        checkpoint = torch.load(self.version_dir(version) / EXTRAS_FILE, map_location="cpu", weights_only=True)
        checkpoint["state_dict"] = weights
        return checkpoint

    def write_checkpoint(self, version: str | None, path: Path) -> Path:
        """Write a version as a ``.ckpt`` the runner's ``--ckpt_path`` accepts (for ``test``/``predict``)."""
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.load_checkpoint(version), path)
        return path

    def load_model(self, version: str | None = None) -> Any:
        """Build the version's LightningModule from its saved hyper-parameters and load its weights
        (strict), in eval mode, through the one checkpoint loader (:func:`pipelines.checkpoints.build_model`):
        the class is the registered domain's model class or the subclass of it that the (verified)
        metadata names; a class outside the domain is refused, never imported."""
        from pipelines.checkpoints import CheckpointRefused, build_model
        from pipelines.domain_registry import get_domain

        version = self.resolve(version)
        checkpoint = self.load_checkpoint(version)  # verifies every file first, metadata included
        spec = get_domain(self.domain)
        label = str(self.version_dir(version) / "metadata.json")
        try:
            return build_model(spec, checkpoint, label, class_path=self.metadata(version).get("model_class"))
        except CheckpointRefused as error:
            raise RegistryError(str(error)) from None
