"""The model registry: versioned models of one domain in a folder, a champion pointer, a history.

The folder (local disk or a mounted volume: NFS, a Kubernetes PersistentVolumeClaim) is the source
of truth; W&B, when online, only mirrors it (:func:`publish_to_wandb`). Layout::

    REGISTRY/<domain>/
        .lock                     fcntl.flock target: one writer per (registry, domain)
        champion.json             {"version": "v0003", "previous": ["v0001"], ...}  (atomic replace)
        evaluation.json           the pinned evaluation data config and the hashes of its files
        history.jsonl             one JSON line per attempt or manual change (appended, fsynced)
        versions/
            v0001/
                model.safetensors        LightningModule.state_dict()
                checkpoint_extras.pt     the rest of the Lightning checkpoint needed to restore it:
                                         hyper-parameters, the data module's fitted state (the
                                         preprocessing), keys a module's on_save_checkpoint adds;
                                         no optimizer, scheduler, loop or callback state
                preprocessing.json       the data module's fitted state, readable (a copy)
                config.yaml              the resolved training config (data, model, trainer)
                metadata.json            fingerprint, evaluation metrics, run folder, git commit,
                                         classes, sha256 of every file above
            .tmp-v0004-<pid>/            a version being written (removed by the next writer)

Safety:

- A version is written into a temporary folder, every file and the folder are fsynced, then the
  folder is renamed into place (``os.rename`` of a directory is atomic on POSIX file systems). The
  champion pointer is a single small file replaced with ``os.replace`` after an fsync. A kill at
  any instant therefore leaves the old champion or the new one, never a mix; a half-written
  version stays in a ``.tmp-*`` folder that no reader looks at.
- Loading never unpickles arbitrary objects: weights are safetensors, the extras are read with
  ``torch.load(weights_only=True)`` (plain containers, tensors and numbers only), and every file's
  sha256 is checked against ``metadata.json`` first.
- Writers (retraining, ``promote``, ``rollback``) hold an ``fcntl.flock`` on ``.lock``; the kernel
  releases it when the process dies, so a killed run never leaves a stale lock behind.

Command line::

    python -m pipelines.registry healthcare list [--registry DIR]       # history table
    python -m pipelines.registry healthcare show [VERSION]              # one version (default: champion)
    python -m pipelines.registry healthcare promote VERSION             # make VERSION the champion
    python -m pipelines.registry healthcare rollback                    # back to the previous champion
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.runs import fsync_dir, write_json_atomic

DEFAULT_REGISTRY = "registry"
REGISTRY_ENV = "PIPELINES_REGISTRY"
WEIGHTS_FILE = "model.safetensors"
EXTRAS_FILE = "checkpoint_extras.pt"
PREPROCESSING_FILE = "preprocessing.json"
CONFIG_FILE = "config.yaml"
METADATA_FILE = "metadata.json"
CHAMPION_FILE = "champion.json"
EVALUATION_FILE = "evaluation.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
#: checkpoint keys that are training state, not model: left out of the registry
TRAINING_STATE_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks")


class RegistryError(RuntimeError):
    """A registry folder or request that is not what was expected (the message names the path)."""


class RegistryLocked(RegistryError):
    """Another process holds the (registry, domain) lock."""


def default_registry() -> Path:
    """``$PIPELINES_REGISTRY`` or ``./registry``."""
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


class ModelRegistry:
    """The registry folder of one domain.

    Args:
        root: the registry folder (holds one sub-folder per domain).
        domain: the domain name.

    Example:
        >>> import tempfile
        >>> registry = ModelRegistry(tempfile.mkdtemp(), "healthcare")
        >>> registry.champion() is None, registry.versions()
        (True, [])
    """

    def __init__(self, root: str | Path, domain: str) -> None:
        self.root = Path(root)
        self.domain = domain
        self.path = self.root / domain
        self.versions_dir = self.path / "versions"

    # ----- locking -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the (registry, domain) write lock; raise :class:`RegistryLocked` at once if taken.

        ``fcntl.flock`` on ``.lock``: the kernel drops it when the holder exits or is killed, so no
        stale lock survives a crash. The file also says who holds it (pid, host, since), for the message.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / LOCK_FILE
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
                raise RegistryLocked(f"{lock_path} is held by another retrain or registry change ({holder})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}).encode(), 0)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    # ----- reading -------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Complete versions, oldest first (``.tmp-*`` folders of interrupted writes are ignored)."""
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX))

    def version_dir(self, version: str) -> Path:
        """Folder of a complete version; ``RegistryError`` naming the valid versions otherwise."""
        path = self.versions_dir / version
        if version.startswith(TMP_PREFIX) or not (path / METADATA_FILE).is_file():
            raise RegistryError(f"no version {version!r} in {self.versions_dir} (versions: {', '.join(self.versions()) or 'none'})")
        return path

    def metadata(self, version: str) -> dict[str, Any]:
        """``metadata.json`` of a version."""
        return json.loads((self.version_dir(version) / METADATA_FILE).read_text())

    def champion_record(self) -> dict[str, Any] | None:
        """The champion pointer (``champion.json``), or ``None`` before the first promotion."""
        path = self.path / CHAMPION_FILE
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise RegistryError(f"{path} is not valid JSON ({error}); expected {{'version': 'vNNNN', ...}}") from None
        if not isinstance(record, dict) or not isinstance(record.get("version"), str):
            raise RegistryError(f"{path} has no 'version' string; expected {{'version': 'vNNNN', ...}}")
        return record

    def champion(self) -> str | None:
        """The champion version name, or ``None``."""
        record = self.champion_record()
        return record["version"] if record else None

    def history(self) -> list[dict[str, Any]]:
        """Every recorded attempt and manual change, oldest first.

        A line cut short by a kill mid-append (only ever the last line) is skipped.
        """
        path = self.path / HISTORY_FILE
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if line.strip():
                    rows.append(json.loads(line))
        return rows

    def evaluation(self) -> dict[str, Any] | None:
        """The pinned evaluation set (``evaluation.json``), or ``None`` before the first retrain."""
        path = self.path / EVALUATION_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    # ----- verification and loading --------------------------------------------------------
    def verify_version(self, version: str) -> dict[str, Any]:
        """Check every file of a version against the sha256 in its metadata; return the metadata."""
        folder = self.version_dir(version)
        metadata = self.metadata(version)
        for name, expected in metadata.get("files", {}).items():
            path = folder / name
            if not path.is_file():
                raise RegistryError(f"{path} is missing (listed in {folder / METADATA_FILE})")
            if sha256_file(path) != expected:
                raise RegistryError(f"{path} does not match its sha256 in {folder / METADATA_FILE}: the file changed or is corrupt")
        return metadata

    def verify(self) -> list[str]:
        """Problems with the registry (an empty list when it is valid): the champion pointer points at
        a complete version whose files match their checksums, every version has its metadata, the
        history parses."""
        problems = []
        try:
            champion = self.champion()
            if champion is not None:
                self.verify_version(champion)
        except RegistryError as error:
            problems.append(str(error))
        for version in self.versions():
            if not (self.versions_dir / version / METADATA_FILE).is_file():
                problems.append(f"{self.versions_dir / version} has no {METADATA_FILE}")
        path = self.path / HISTORY_FILE
        if path.is_file():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            for number, line in enumerate(lines[:-1], 1):  # the last line may be cut by a kill; earlier ones never
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    problems.append(f"{path}: line {number} is not JSON")
        return problems

    def load_weights(self, version: str | None = None) -> dict[str, Any]:
        """The LightningModule ``state_dict`` of a version (default: the champion), from safetensors."""
        from safetensors.torch import load_file

        version = self._version_or_champion(version)
        self.verify_version(version)
        return load_file(str(self.version_dir(version) / WEIGHTS_FILE))

    def load_checkpoint(self, version: str | None = None) -> dict[str, Any]:
        """A Lightning checkpoint dict of a version (weights + hyper-parameters + data module state),
        read without unpickling code: safetensors and ``torch.load(weights_only=True)``."""
        import torch

        version = self._version_or_champion(version)
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
        (strict), in eval mode. The class is the one recorded in the metadata."""
        from pipelines.registry import _import_dotted

        version = self._version_or_champion(version)
        checkpoint = self.load_checkpoint(version)
        model_class = _import_dotted(self.metadata(version)["model_class"])
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        model = model_class(**hparams)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
        return model.eval()

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
        """``v0001``, ``v0002``, ... (one more than the highest complete version)."""
        numbers = [int(v[1:]) for v in self.versions() if v[1:].isdigit()]
        return f"v{max(numbers, default=0) + 1:04d}"

    def add_version(self, checkpoint_path: Path, config_text: str, metadata: dict[str, Any], datamodule_key: str | None) -> str:
        """Store a Lightning checkpoint as a new version (not yet champion) and return its name.

        The checkpoint is read with ``torch.load(weights_only=True)``; its ``state_dict`` goes to
        safetensors, its training state (optimizer, loops, callbacks) is dropped. Everything is
        written to a ``.tmp-*`` folder, fsynced, then renamed into place.

        Args:
            checkpoint_path: the ``best.ckpt`` of the run that trained the model.
            config_text: the resolved config (YAML) of that run.
            metadata: fields recorded in ``metadata.json`` (fingerprint, metrics, run folder, ...).
            datamodule_key: the checkpoint key that holds the data module's state (its class name).
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
        extras = {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE_KEYS}
        torch.save(extras, tmp / EXTRAS_FILE)
        preprocessing = checkpoint.get(datamodule_key) if datamodule_key else None
        (tmp / PREPROCESSING_FILE).write_text(json.dumps(_json_safe(preprocessing), indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(config_text)
        files = {name: sha256_file(tmp / name) for name in (WEIGHTS_FILE, EXTRAS_FILE, PREPROCESSING_FILE, CONFIG_FILE)}
        record = {"version": version, "domain": self.domain, "created_at": _now(), **metadata, "files": files}
        (tmp / METADATA_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        for name in (*files, METADATA_FILE):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        os.rename(tmp, self.versions_dir / version)  # atomic: the version appears complete or not at all
        fsync_dir(self.versions_dir)
        return version

    def set_champion(self, version: str, reason: str) -> dict[str, Any]:
        """Point the champion at ``version`` (atomic). The previous champion is pushed on the
        ``previous`` stack that :meth:`rollback` pops."""
        self.verify_version(version)
        current = self.champion_record()
        previous = list(current.get("previous", [])) if current else []
        if current and current["version"] != version:
            previous.append(current["version"])
        record = {"version": version, "since": _now(), "reason": reason, "previous": previous}
        write_json_atomic(self.path / CHAMPION_FILE, record, durable=True)
        return record

    def rollback(self) -> dict[str, Any]:
        """Make the previous champion the champion again (atomic); ``RegistryError`` when there is none."""
        current = self.champion_record()
        if not current or not current.get("previous"):
            raise RegistryError(f"{self.path / CHAMPION_FILE}: no previous champion to roll back to")
        *rest, previous = current["previous"]
        self.verify_version(previous)
        record = {"version": previous, "since": _now(), "reason": f"rollback from {current['version']}", "previous": rest}
        write_json_atomic(self.path / CHAMPION_FILE, record, durable=True)
        return record

    def pin_evaluation(self, record: dict[str, Any]) -> None:
        """Pin the evaluation set (first retrain only; it never changes afterwards)."""
        if self.evaluation() is not None:
            raise RegistryError(f"{self.path / EVALUATION_FILE} is already pinned")
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / EVALUATION_FILE, {**record, "pinned_at": _now()}, durable=True)

    def append_history(self, row: dict[str, Any]) -> None:
        """Append one history line (one ``write`` on an ``O_APPEND`` descriptor, then fsync)."""
        self.path.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(row, default=str) + "\n").encode()
        fd = os.open(self.path / HISTORY_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ----- W&B mirror ------------------------------------------------------------------------------
def publish_to_wandb(registry: ModelRegistry, version: str, aliases: list[str], group: str) -> str:
    """Log a version as a W&B model artifact (``<domain>-model``) with ``aliases``; return what happened.

    Only when W&B is online (``WANDB_MODE`` online or an API key; :func:`pipelines.tracking.configure_wandb_mode`);
    called after the registry folder has been updated, and every error is caught and reported, so
    an offline or unreachable W&B never blocks or undoes a promotion.
    """
    from pipelines.tracking import configure_wandb_mode

    mode = configure_wandb_mode()
    if mode in ("offline", "disabled", "dryrun"):
        return f"skipped (WANDB_MODE={mode})"
    try:
        import wandb

        folder = registry.version_dir(version)
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", f"domain-pipelines-{registry.domain}"),
            job_type="registry",
            group=group,
            name=f"registry-{version}",
            settings=wandb.Settings(init_timeout=30),
            reinit="finish_previous",
        )
        artifact = wandb.Artifact(f"{registry.domain}-model", type="model", metadata=registry.metadata(version))
        for name in (WEIGHTS_FILE, EXTRAS_FILE, PREPROCESSING_FILE, CONFIG_FILE, METADATA_FILE):
            artifact.add_file(str(folder / name), name=name)
        run.log_artifact(artifact, aliases=[version, *aliases])
        run.finish()
        return f"logged {registry.domain}-model ({', '.join([version, *aliases])})"
    except Exception as error:  # noqa: BLE001 - the registry folder is the source of truth
        print(f"[registry] W&B unreachable, artifact not logged (the registry folder is up to date): {error}", file=sys.stderr)
        return f"failed: {error}"


def move_wandb_alias(registry: ModelRegistry, version: str, alias: str = "champion") -> str:
    """Move a W&B alias to the artifact of ``version`` (manual promote/rollback); best effort, online only."""
    from pipelines.tracking import configure_wandb_mode

    mode = configure_wandb_mode()
    if mode in ("offline", "disabled", "dryrun"):
        return f"skipped (WANDB_MODE={mode})"
    try:
        import wandb

        api = wandb.Api(timeout=30)
        project = os.environ.get("WANDB_PROJECT", f"domain-pipelines-{registry.domain}")
        entity = os.environ.get("WANDB_ENTITY") or api.default_entity
        artifact = api.artifact(f"{entity}/{project}/{registry.domain}-model:{version}")
        artifact.aliases = sorted(set(artifact.aliases) | {alias})
        artifact.save()
        return f"alias {alias} -> {version}"
    except Exception as error:  # noqa: BLE001
        print(f"[registry] W&B alias not moved (the registry folder is up to date): {error}", file=sys.stderr)
        return f"failed: {error}"


# ----- history table ---------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def format_history(rows: list[dict[str, Any]], champion: str | None = None) -> str:
    """The history as a fixed-width table (one line per attempt or manual change)."""
    headers = ["time", "decision", "challenger", "score", "champion", "score", "metric", "fingerprint", "commit", "run"]
    lines = []
    for row in rows:
        challenger, incumbent = row.get("challenger") or {}, row.get("champion") or {}
        lines.append([
            str(row.get("time", "-"))[:19].replace("T", " "),
            row.get("decision", "-"),
            _fmt(challenger.get("version")) + ("*" if champion and challenger.get("version") == champion else ""),
            _fmt(challenger.get("score")),
            _fmt(incumbent.get("version")),
            _fmt(incumbent.get("score")),
            _fmt(row.get("metric")) + ({"max": " ↑", "min": " ↓"}.get(row.get("mode", ""), "")),
            str(row.get("fingerprint") or "-")[:12],
            str(row.get("git_commit") or "-")[:10] + ("+" if str(row.get("git_commit", "")).endswith("-dirty") else ""),
            Path(str(row.get("run_dir"))).name if row.get("run_dir") else "-",
        ])  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    render = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [headers, *lines]]
    render.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(render)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.registry DOMAIN {list,show [VERSION],promote VERSION,rollback} [--registry DIR]``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", type=Path, default=argparse.SUPPRESS, help=f"registry folder (default: ${REGISTRY_ENV} or ./{DEFAULT_REGISTRY})")
    parser = argparse.ArgumentParser(prog="python -m pipelines.registry", description="Read and change a domain's model registry.", parents=[common])
    parser.add_argument("domain")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the history table and the versions", parents=[common])
    show = commands.add_parser("show", help="one version's metadata (default: the champion)", parents=[common])
    show.add_argument("version", nargs="?")
    promote = commands.add_parser("promote", help="make VERSION the champion", parents=[common])
    promote.add_argument("version")
    commands.add_parser("rollback", help="make the previous champion the champion again", parents=[common])
    args = parser.parse_args(argv)
    registry = ModelRegistry(getattr(args, "registry", None) or default_registry(), args.domain)
    if not registry.path.is_dir():
        print(f"error: no registry for {args.domain!r} at {registry.path}", file=sys.stderr)
        return 1
    try:
        if args.command == "list":
            champion = registry.champion()
            print(format_history(registry.history(), champion))
            print(f"\nchampion: {champion or 'none'}   versions: {', '.join(registry.versions()) or 'none'}   (* = current champion)")
        elif args.command == "show":
            version = registry._version_or_champion(args.version)
            metadata = registry.verify_version(version)
            print(json.dumps({**metadata, "champion": version == registry.champion()}, indent=2, default=str))
        else:
            with registry.lock():
                before = registry.champion()
                if args.command == "promote":
                    record = registry.set_champion(args.version, "manual promote")
                else:
                    record = registry.rollback()
                registry.append_history({
                    "time": _now(), "decision": f"manual-{args.command}", "domain": args.domain,
                    "challenger": {"version": record["version"]}, "champion": {"version": before},
                    "host": socket.gethostname(), "user": os.environ.get("USER"),
                })  # fmt: skip
            wandb_note = move_wandb_alias(registry, record["version"])
            print(f"champion: {before or 'none'} -> {record['version']}  (W&B: {wandb_note})")
    except RegistryLocked as error:
        print(f"locked: {error}", file=sys.stderr)
        return 5  # the same code as pipelines.retrain.ExitCode.LOCKED
    except RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
