"""The model registry: versioned models of one domain in a folder, named pointers, a history.

The folder (local disk or a mounted volume: NFS, a Kubernetes PersistentVolumeClaim) is the source
of truth; W&B, when online, only mirrors it (:mod:`pipelines.registry_cli`). Layout::

    REGISTRY/<domain>/
        .lock                     fcntl.flock target: one writer per (registry, domain)
        champion.json             {"version": "v0003", "previous": ["v0001"], ...}  (atomic replace)
        aliases.json              other named pointers: {"staging": "v0004", "canary": "v0002"}
        evaluation.json           the pinned evaluation set (:mod:`pipelines.evaluation_set`); its paths into
                                  the registry are ``@registry/evaluation/...`` (relative to this folder)
        evaluation/<sha256>/      content-addressed copies of the files it reads
        history.jsonl             one JSON line per attempt or change (appended, fsynced)
        versions/
            v0001/
                model.safetensors        LightningModule.state_dict()
                checkpoint_extras.pt     the rest of the Lightning checkpoint needed to restore it
                                         (hyper-parameters, the data module's fitted state); no
                                         optimizer, scheduler, loop or callback state
                preprocessing.json       the data module's fitted state, readable (a copy)
                config.yaml              the resolved training config (data, model, trainer)
                metadata.json            fingerprint, evaluation metrics, decision, run folder, git commit
                SHA256SUMS               sha256 of every file above, metadata.json included
                                         (``sha256sum -c SHA256SUMS`` checks a copy by hand)
            .tmp-v0004-<pid>/            a version being written (removed by the next writer)

Safety:

- A version is written into a temporary folder, every file and the folder are fsynced, then the
  folder is renamed into place (atomic on POSIX). Pointers are small files replaced with
  ``os.replace`` after an fsync. A kill at any instant leaves the old state or the new one; a
  version written but never recorded (kill before promotion) is an *orphan* that the next writer
  reconciles from the decision stored in its metadata (:mod:`pipelines.registry_upkeep`).
- Loading never unpickles objects and never imports a class named in a file: weights are
  safetensors, the extras are read with ``torch.load(weights_only=True)``, every file (metadata
  included) is checked against ``SHA256SUMS`` first, and the model class is the registered
  domain's own (:func:`pipelines.domain_registry.get_domain`).
- Writers hold an ``fcntl.flock`` on ``.lock``; the kernel releases it when the process dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.files import fsync_dir, sha256_file, write_json_atomic
from pipelines.registry_loading import (
    CHAMPION, EVALUATION_FILE, EXTRAS_FILE, HISTORY_FILE, MANIFEST_FILE, METADATA_FILE, WEIGHTS_FILE, LoadingMixin, RegistryError, pin_absolute, pin_relative, read_history,
)  # fmt: skip

DEFAULT_REGISTRY = "registry"
REGISTRY_ENV = "PIPELINES_REGISTRY"
PREPROCESSING_FILE = "preprocessing.json"
CONFIG_FILE = "config.yaml"
CHAMPION_FILE = "champion.json"
ALIASES_FILE = "aliases.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
#: checkpoint keys that are training state, not model: left out of the registry
TRAINING_STATE_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks")


class RegistryLocked(RegistryError):
    """Another process holds the (registry, domain) lock."""


def default_registry() -> Path:
    """``$PIPELINES_REGISTRY`` or ``./registry``."""
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _json_safe(value: Any) -> Any:
    """A JSON view of checkpoint values (tensors and arrays become lists, anything else its ``str``)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):
        return _json_safe(value.tolist())
    return str(value)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def alias_name_problem(name: str, domain: str) -> str | None:
    """Why ``name`` cannot be an alias (in words, with how to move the champion), or ``None``: an alias is a name of
    letters, digits, ``-`` or ``_`` starting with a letter, other than ``champion``, which only promote/rollback move."""
    how = f"`python -m pipelines.registry {domain} promote VERSION` or `... {domain} rollback` move the champion"
    if name == CHAMPION:
        return f"alias {name!r}: the champion is not an alias; {how}"
    if not name or not name.replace("-", "").replace("_", "").isalnum() or not name[0].isalpha():
        return f"alias {name!r}: use a name of letters, digits, '-' or '_' starting with a letter, other than {CHAMPION!r} ({how})"
    return None


class ModelRegistry(LoadingMixin):
    """The registry folder of one domain.

    Args:
        root: the registry folder (holds one sub-folder per domain).
        domain: the domain name.

    Example:
        >>> import tempfile
        >>> registry = ModelRegistry(tempfile.mkdtemp(), "healthcare")
        >>> registry.champion() is None, registry.versions(), registry.aliases()
        (True, [], {})
    """

    def __init__(self, root: str | Path, domain: str) -> None:
        self.root = Path(root)
        self.domain = domain
        self.path = self.root / domain
        self.versions_dir = self.path / "versions"

    # ----- locking ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the (registry, domain) write lock; raise :class:`RegistryLocked` at once if taken.

        ``fcntl.flock`` on ``.lock``: the kernel drops it when the holder exits or is killed, so no
        stale lock survives a crash. The file also says who holds it (pid, host, since), for the message.
        """
        lock_path = self.path / LOCK_FILE
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RegistryError(f"cannot open the registry lock {lock_path} ({error.strerror}): is the registry read-only?") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
                raise RegistryLocked(f"{lock_path} is held by another retrain or registry change ({holder})") from None
            with contextlib.suppress(OSError):  # a read-only lock file still locks; the holder note is a courtesy
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now()}).encode(), 0)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def is_locked(self) -> bool:
        """Whether some process holds the lock now (tries it without waiting)."""
        try:
            with self.lock():
                return False
        except RegistryLocked:
            return True

    # ----- reading -------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Complete versions, oldest first (``.tmp-*`` folders of interrupted writes are ignored)."""
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX))

    def version_dir(self, version: str) -> Path:
        """Folder of a complete version; ``RegistryError`` naming the valid versions otherwise."""
        path = self.versions_dir / version
        if version.startswith(TMP_PREFIX) or "/" in version or not (path / METADATA_FILE).is_file():
            raise RegistryError(f"no version {version!r} in {self.versions_dir} (versions: {', '.join(self.versions()) or 'none'})")
        return path

    def metadata(self, version: str) -> dict[str, Any]:
        """``metadata.json`` of a version (not verified: :meth:`verify_version` checks it)."""
        return json.loads((self.version_dir(version) / METADATA_FILE).read_text())

    def _read_json(self, name: str) -> Any:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise RegistryError(f"{path} is not valid JSON ({error})") from None

    def champion_record(self) -> dict[str, Any] | None:
        """The champion pointer (``champion.json``), or ``None`` before the first promotion."""
        record = self._read_json(CHAMPION_FILE)
        if record is not None and (not isinstance(record, dict) or not isinstance(record.get("version"), str)):
            raise RegistryError(f"{self.path / CHAMPION_FILE} has no 'version' string; expected {{'version': 'vNNNN', ...}}")
        return record

    def champion(self) -> str | None:
        """The champion version name, or ``None``."""
        record = self.champion_record()
        return record["version"] if record else None

    def rollback_chain(self) -> list[str]:
        """The champion and the previous champions ``rollback`` would return to."""
        record = self.champion_record()
        return [record["version"], *record.get("previous", [])] if record else []

    def aliases(self) -> dict[str, str]:
        """Named pointers other than the champion (``staging``, ``canary``, ...)."""
        return dict(self._read_json(ALIASES_FILE) or {})

    def resolve(self, name: str | None) -> str:
        """A version name, an alias or ``champion`` (also ``None``) -> a version name."""
        if name in (None, CHAMPION):
            return self._version_or_champion(None)
        return self.aliases().get(name, name)

    def history(self) -> list[dict[str, Any]]:
        """Every recorded attempt and change, oldest first (a last line cut by a kill is left out:
        :func:`~pipelines.registry_loading.read_history`); ``RegistryError`` naming a damaged line."""
        rows, damage = read_history(self.path / HISTORY_FILE)
        if damage:
            raise RegistryError(
                f"{damage[0]}{f' (and {len(damage) - 1} more line(s))' if len(damage) > 1 else ''}: the registry's record of attempts is damaged, "
                f"and reading past the line would forget what it recorded. Restore {self.path / HISTORY_FILE} from a backup, or move the "
                f"line out by hand once you know what it recorded; `registry {self.domain} verify` lists every such line"
            )  # fmt: skip
        return rows

    def evaluation(self) -> dict[str, Any] | None:
        """The pinned evaluation set (``evaluation.json``), or ``None`` before the first promotion; its paths
        into the registry (stored as ``@registry/...``) are given where the registry is now."""
        record = self._read_json(EVALUATION_FILE)
        return pin_absolute(record, self.path) if isinstance(record, dict) else record

    def _version_or_champion(self, version: str | None) -> str:
        if version is not None:
            return version
        champion = self.champion()
        if champion is None:
            raise RegistryError(f"{self.path} has no champion yet (no promotion recorded in {self.path / CHAMPION_FILE})")
        return champion

    # ----- writing (hold :meth:`lock`) -----------------------------------------------------
    def remove_partial_versions(self) -> list[str]:
        """Delete ``.tmp-*`` folders left by interrupted writes; return their names."""
        if not self.versions_dir.is_dir():
            return []
        removed = [p for p in self.versions_dir.iterdir() if p.name.startswith(TMP_PREFIX)]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return [p.name for p in removed]

    def next_version(self) -> str:
        """``v0001``, ``v0002``, ... (one more than the highest version ever recorded, so a pruned
        version's name is never reused)."""
        numbers = [int(v[1:]) for v in self.versions() if v[1:].isdigit()]
        for row in self.history():
            name = str((row.get("challenger") or {}).get("version") or "")
            numbers += [int(v[1:]) for v in [name, *row.get("removed", [])] if str(v)[1:].isdigit()]
        return f"v{max(numbers, default=0) + 1:04d}"

    def add_version(self, checkpoint_path: Path, config_text: str, metadata: dict[str, Any], datamodule_key: str | None) -> str:
        """Store a Lightning checkpoint as a new version (not yet champion) and return its name.

        The checkpoint is read with ``torch.load(weights_only=True)``; its ``state_dict`` goes to
        safetensors, its training state is dropped. Everything is written to a ``.tmp-*`` folder,
        fsynced, then renamed into place.
        """
        import torch
        from safetensors.torch import save_file

        try:
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise RegistryError(f"cannot read checkpoint {checkpoint_path} weights-only: {error}") from None
        if "state_dict" not in checkpoint:
            raise RegistryError(f"{checkpoint_path} has no 'state_dict': expected a Lightning checkpoint")
        version = self.next_version()
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.versions_dir / f"{TMP_PREFIX}{version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in checkpoint["state_dict"].items()}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"domain": self.domain, "version": version})
        torch.save({k: v for k, v in checkpoint.items() if k not in TRAINING_STATE_KEYS}, tmp / EXTRAS_FILE)
        preprocessing = checkpoint.get(datamodule_key) if datamodule_key else None
        (tmp / PREPROCESSING_FILE).write_text(json.dumps(_json_safe(preprocessing), indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(config_text)
        record = {"version": version, "domain": self.domain, "created_at": now(), **metadata}
        (tmp / METADATA_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        names = (WEIGHTS_FILE, EXTRAS_FILE, PREPROCESSING_FILE, CONFIG_FILE, METADATA_FILE)
        (tmp / MANIFEST_FILE).write_text("".join(f"{sha256_file(tmp / name)}  {name}\n" for name in names))
        for name in (*names, MANIFEST_FILE):
            _fsync_file(tmp / name)
        fsync_dir(tmp)
        os.rename(tmp, self.versions_dir / version)  # atomic: the version appears complete or not at all
        fsync_dir(self.versions_dir)
        return version

    def set_champion(self, version: str, reason: str) -> dict[str, Any]:
        """Point the champion at ``version`` (atomic); the previous one goes on the ``rollback`` stack."""
        self.verify_version(version)
        current = self.champion_record()
        previous = list(current.get("previous", [])) if current else []
        if current and current["version"] != version:
            previous.append(current["version"])
        record = {"version": version, "since": now(), "reason": reason, "previous": previous}
        write_json_atomic(self.path / CHAMPION_FILE, record, durable=True)
        return record

    def rollback(self) -> dict[str, Any]:
        """Make the previous champion the champion again (atomic); ``RegistryError`` when there is none."""
        current = self.champion_record()
        if not current or not current.get("previous"):
            raise RegistryError(f"{self.path / CHAMPION_FILE}: no previous champion to roll back to")
        *rest, previous = current["previous"]
        self.verify_version(previous)
        record = {"version": previous, "since": now(), "reason": f"rollback from {current['version']}", "previous": rest}
        write_json_atomic(self.path / CHAMPION_FILE, record, durable=True)
        return record

    def set_alias(self, name: str, version: str | None) -> str | None:
        """Point alias ``name`` at ``version`` (``None`` removes it); return what it pointed at before."""
        problem = alias_name_problem(name, self.domain)
        if problem:
            raise RegistryError(problem)
        aliases = self.aliases()
        before = aliases.get(name)
        if version is None:
            if before is None:
                raise RegistryError(f"no alias {name!r} in {self.path / ALIASES_FILE} (aliases: {', '.join(aliases) or 'none'})")
            aliases.pop(name)
        else:
            self.verify_version(version)
            aliases[name] = version
        write_json_atomic(self.path / ALIASES_FILE, dict(sorted(aliases.items())), durable=True)
        return before

    def pin_evaluation(self, record: dict[str, Any], replace: bool = False) -> None:
        """Pin the evaluation set; an existing pin is only replaced with ``replace`` (``registry repin``)."""
        if self.evaluation() is not None and not replace:
            raise RegistryError(f"{self.path / EVALUATION_FILE} is already pinned (replace it with `registry {self.domain} repin`)")
        write_json_atomic(self.path / EVALUATION_FILE, {**pin_relative(record, self.path), "pinned_at": now()}, durable=True)  # moves with the registry

    def append_history(self, row: dict[str, Any]) -> None:
        """Append one history line (one ``write`` on an ``O_APPEND`` descriptor, then fsync)."""
        self.path.mkdir(parents=True, exist_ok=True)
        data = (json.dumps({"time": now(), **row}, default=str) + "\n").encode()
        fd = os.open(self.path / HISTORY_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = _after_cut_line(fd) + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def _after_cut_line(fd: int) -> bytes:
    """A history row for a last line cut by a kill (its text kept), which is removed so that the next
    row starts a line of its own; ``b""`` when the file ends with a newline (the writer holds the lock)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return b""
    start = size
    while start > 0:
        chunk = os.pread(fd, min(start, 65536), max(0, start - 65536))
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            start = start - len(chunk) + newline + 1
            break
        start -= len(chunk)
    fragment = os.pread(fd, size - start, start)
    os.ftruncate(fd, start)
    record = {"time": now(), "decision": "cut-line", "text": fragment.decode(errors="replace"), "note": "an earlier write was cut by a kill; its text, never a complete record, moved here"}
    return (json.dumps(record) + "\n").encode()
