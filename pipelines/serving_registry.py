"""Serving a registry alias with hot reload (``python -m pipelines.serve DOMAIN --registry DIR --alias champion``).

Three parts, in three kinds of process:

- :class:`RegistryWatcher` (the server's main process, a thread): resolves the alias in the model
  registry every ``--reload_interval`` seconds and at once on SIGHUP; when it names another version,
  exports that version to a bundle in the bundle cache (a child process running
  ``python -m pipelines.serving_registry``: torch, Lightning and the domain's code never enter the
  server's processes) and then publishes it by replacing ``current.json`` in the cache atomically.
  A failed export is logged and counted (``pipelines_serve_model_reloads_total{result="export_failed"}``);
  the server keeps serving the version it has. A SIGTERM during the first export (before the server
  listens) stops the export child, which removes its staging folder, and exits 143: the cache holds
  complete bundles or nothing, and the server's own temporary folders are removed. The export child
  dies with the server (``PR_SET_PDEATHSIG``) if the server is killed.
- :class:`ModelSlot` (each inference worker): the model that answers. In registry mode a thread
  polls ``current.json`` and loads the new bundle beside the old one, then swaps the reference: no
  request waits for a load, and every request is predicted by the model that decoded it, so
  requests in flight during a swap finish on the old model.
- :func:`read_pointer` (the HTTP processes): ``/info`` and the model headers of answers that never
  reached a worker show the published model.

A bundle exported from the registry records, as ``source_checkpoint``, the registry version's
``model.safetensors`` (its sha256 is the one in the version's ``SHA256SUMS``), as ``model_version``
the registry version, and the registry, domain and alias under ``registry``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.files import write_json_atomic
from pipelines.option_spelling import OptionParser
from pipelines.stops import sigterm_as_exit, stop_process

logger = logging.getLogger("pipelines.serve")

POINTER_FILE = "current.json"
EXPORT_TIMEOUT = 600.0
STOP_GRACE_S = 30.0  # seconds an export child gets to remove its staging folder after SIGTERM


def read_pointer(cache: Path) -> dict[str, Any] | None:
    """The published model (``{"version", "bundle", "identity", "published_at"}``), or ``None`` before the first."""
    try:
        return json.loads((cache / POINTER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class PointerReader:
    """:func:`read_pointer` re-read only when the file changed (HTTP processes call it per request)."""

    def __init__(self, cache: Path) -> None:
        self.path = cache / POINTER_FILE
        self._stamp: tuple[int, int] | None = None
        self._value: dict[str, Any] | None = None

    def __call__(self) -> dict[str, Any] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return self._value
        stamp = (stat.st_mtime_ns, stat.st_ino)
        if stamp != self._stamp:
            value = read_pointer(self.path.parent)
            if value is not None:
                self._stamp, self._value = stamp, value
        return self._value


def weights_sha256(registry: Any, version: str) -> str:
    """The sha256 of a registry version's ``model.safetensors`` as its ``SHA256SUMS`` records it."""
    from pipelines.registry_loading import WEIGHTS_FILE

    manifest = registry.version_dir(version) / "SHA256SUMS"
    for line in manifest.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name == WEIGHTS_FILE:
            return digest
    raise ValueError(f"{manifest} lists no {WEIGHTS_FILE}")


def export_version(root: Path, domain: str, version: str, output: Path, fmt: str = "onnx", alias: str | None = None) -> Path:
    """Export a verified registry version to a bundle folder (complete or absent: :func:`pipelines.export.export_checkpoint`)."""
    from pipelines.export import export_checkpoint
    from pipelines.model_registry import ModelRegistry
    from pipelines.domain_registry import get_domain

    registry = ModelRegistry(root, domain)
    registry.verify_version(version)
    sha256 = weights_sha256(registry, version)
    with tempfile.TemporaryDirectory(prefix="pipelines-serve-export-") as tmp:
        ckpt = registry.write_checkpoint(version, Path(tmp) / f"{version}.ckpt")
        source = {"name": str(registry.version_dir(version) / "model.safetensors"), "sha256": sha256}
        origin = {"root": str(Path(root).resolve()), "domain": domain, "version": version, "exported_for_alias": alias}
        return export_checkpoint(
            get_domain(domain), ckpt, fmt, output, model_version=version, extra_metadata={"source_checkpoint": source, "registry": origin},
            replace=True,  # the server's own cache: a stale bundle of this version is exported again
        )


@dataclass
class RegistryWatcher:
    """Follows ``alias`` of ``domain``'s registry at ``root``; publishes each new version's bundle in ``cache``."""

    root: Path
    domain: str
    alias: str
    cache: Path
    fmt: str = "onnx"
    interval: float = 2.0
    wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _child: subprocess.Popen | None = None
    _thread: threading.Thread | None = None
    _failed: str | None = None

    def resolve(self) -> str:
        from pipelines.model_registry import ModelRegistry

        registry = ModelRegistry(self.root, self.domain)
        version = registry.resolve(self.alias)
        registry.version_dir(version)  # RegistryError naming the versions when the alias names none
        return version

    def bundle_dir(self, version: str) -> Path:
        return self.cache / f"{version}-{self.fmt}"

    def export(self, version: str) -> Path:
        """The version's bundle in the cache: reused when its source is still the registry's weights, else exported in a child process."""
        from pipelines.model_registry import ModelRegistry

        output = self.bundle_dir(version)
        registry = ModelRegistry(self.root, self.domain)
        registry.verify_version(version)  # every file against SHA256SUMS, also when a cached bundle is reused
        with_sha = weights_sha256(registry, version)
        try:
            if json.loads((output / "metadata.json").read_text())["source_checkpoint"]["sha256"] == with_sha:
                return output
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            pass
        command = [sys.executable, "-m", "pipelines.serving_registry", str(self.root), self.domain, version, str(output), "--format", self.fmt,
                   "--alias", self.alias, f"--parent={os.getpid()}"]  # fmt: skip
        started = time.monotonic()
        self._child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = self._child.communicate(timeout=EXPORT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._child.kill()
            out, _ = self._child.communicate()
        except BaseException:  # this server is stopping (SIGTERM during the first export: SystemExit): the export stops too
            self._stop_child(output)
            raise
        code, self._child = self._child.returncode, None
        if code != 0 or not (output / "metadata.json").is_file():
            tail = "\n".join(out.strip().splitlines()[-5:])
            raise RuntimeError(f"exporting {self.domain} {version} from {self.root} failed (exit {code}): {tail}")
        logger.info("exported %s %s to %s in %.1f s", self.domain, version, output, time.monotonic() - started)
        return output

    def _stop_child(self, output: Path) -> None:
        """Stop the export child (it removes its staging folder on SIGTERM) and remove what a killed one left: the cache
        then holds complete bundles only."""
        child, self._child = self._child, None
        if child is not None:
            stop_process(child, STOP_GRACE_S)
        for staging in output.parent.glob(f".{output.name}.*"):  # export_checkpoint's staging folder (tempfile.mkdtemp)
            shutil.rmtree(staging, ignore_errors=True)

    def publish(self, version: str, bundle: Path, info: dict[str, Any]) -> None:
        """Point ``current.json`` at ``bundle`` with its ``/info`` (atomic replace); remove cached bundles other than this one and the one before."""
        before = read_pointer(self.cache)
        info = {**info, "registry": {**(info.get("registry") or {}), "alias": self.alias}}  # a cached bundle may have been exported for another alias
        identity = {key: info[key] for key in ("name", "version", "checkpoint_sha256")}
        write_json_atomic(self.cache / POINTER_FILE, {
            "version": version, "alias": self.alias, "bundle": str(bundle), "identity": identity, "info": info,
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })  # fmt: skip
        keep = {bundle.name, Path(before["bundle"]).name if before else ""}
        for path in self.cache.iterdir():
            if path.is_dir() and path.name not in keep and not path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)

    def check(self, describe: Callable[[dict[str, Any], Path], dict[str, Any]]) -> bool:
        """One look at the alias; export and publish when it moved. Returns whether a new version was published."""
        try:
            version = self.resolve()
            current = read_pointer(self.cache)
            if current is not None and current["version"] == version:
                self._failed = None
                return False
            if self._failed == version:  # one failure per version is enough; SIGHUP retries
                return False
            bundle = self.export(version)
            metadata = json.loads((bundle / "metadata.json").read_text())
            self.publish(version, bundle, describe(metadata, bundle))
            logger.info("%s -> %s: published %s (was %s)", self.alias, version, bundle, current["version"] if current else "none")
            return True
        except Exception as error:  # noqa: BLE001 - the server keeps serving what it has
            if not self._stop.is_set():
                self._failed = locals().get("version")
                logger.error("registry %s alias %s: %s; still serving %s", self.root, self.alias, error, (read_pointer(self.cache) or {}).get("version"))
                from pipelines import serving_metrics

                serving_metrics.metrics().reloads.labels(result="export_failed").inc()
            return False

    def first(self, describe: Callable[[dict[str, Any], Path], dict[str, Any]]) -> str:
        """Resolve, export and publish the alias's version now (at start). ``ValueError``: the alias names no version;
        ``RuntimeError``: the export failed."""
        from pipelines.registry_loading import RegistryError

        if not (self.root / self.domain).is_dir():
            raise ValueError(f"no registry of domain {self.domain!r} (no folder {self.root / self.domain})")
        try:
            version = self.resolve()
        except RegistryError as error:
            raise ValueError(str(error)) from None
        with sigterm_as_exit("serve --registry (first export)"):  # SystemExit(143): the export stops, the caller's clean-up runs
            bundle = self.export(version)
            self.publish(version, bundle, describe(json.loads((bundle / "metadata.json").read_text()), bundle))
        return version

    def start(self, describe: Callable[[dict[str, Any], Path], dict[str, Any]]) -> None:
        """Look at the alias every ``interval`` seconds (at once when ``wake`` is set) in a daemon thread."""
        def loop() -> None:
            while not self._stop.is_set():
                forced = self.wake.wait(self.interval)
                if self._stop.is_set():
                    return
                if forced:
                    self.wake.clear()
                    self._failed = None
                self.check(describe)

        self._thread = threading.Thread(target=loop, name="registry-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
        if self._thread is not None:
            self._thread.join(10)


@dataclass(frozen=True)
class Loaded:
    """One loaded model: its bundle, request adapters, identity and the headers of its answers."""

    bundle: Any
    adapters: list
    identity: dict[str, str]
    pointer: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Model-Name": self.identity["name"], "X-Model-Version": self.identity["version"], "X-Model-Checkpoint-Sha256": self.identity["checkpoint_sha256"]}


class ModelSlot:
    """The model an inference worker answers with, swapped whole (a reference assignment) when ``current.json`` changes."""

    def __init__(self, load: Callable[[str, dict[str, str] | None], Loaded], cache: Path, poll: float = 0.2) -> None:
        self.load, self.cache, self.poll = load, cache, poll
        self.reader = PointerReader(cache)
        pointer = self.reader()
        if pointer is None:
            raise RuntimeError(f"{cache / POINTER_FILE}: no published model")
        self.current: Loaded = load(pointer["bundle"], pointer["identity"])
        threading.Thread(target=self._follow, name="model-slot", daemon=True).start()

    def _follow(self) -> None:
        from pipelines import serving_metrics

        while True:
            time.sleep(self.poll)
            pointer = self.reader()
            if pointer is None or pointer["bundle"] == self.current.pointer:
                continue
            old = self.current
            try:
                new = self.load(pointer["bundle"], pointer["identity"])
            except Exception:  # noqa: BLE001
                logger.exception("loading %s failed; still serving %s", pointer["bundle"], old.identity["version"])
                serving_metrics.metrics().reloads.labels(result="failed").inc()
                self.current = Loaded(old.bundle, old.adapters, old.identity, pointer["bundle"])  # do not retry this bundle
                continue
            self.current = new
            serving_metrics.set_model_info(old, served=False)
            serving_metrics.metrics().reloads.labels(result="loaded").inc()
            logger.info("now serving %s %s (was %s)", new.identity["name"], new.identity["version"], old.identity["version"])


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.serving_registry ROOT DOMAIN VERSION OUTPUT [--format onnx]``: export one registry version (the watcher's child)."""
    parser = OptionParser(prog="python -m pipelines.serving_registry", description="export a registry version to a bundle")
    parser.add_argument("root", type=Path)
    parser.add_argument("domain")
    parser.add_argument("version")
    parser.add_argument("output", type=Path)
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    parser.add_argument("--alias", default=None)
    parser.add_argument("--parent", type=int, default=None, help="die with this process (the server), which stops no export otherwise")
    args = parser.parse_args(argv)
    from pipelines.child_run import die_with_parent
    from pipelines.registry_loading import RegistryError

    if args.parent is not None:
        die_with_parent(args.parent)
    try:
        with sigterm_as_exit("serve --registry export"):  # a stopped export leaves no staging folder in the cache
            bundle = export_version(args.root, args.domain, args.version, args.output, args.format, args.alias)
    except (RegistryError, ValueError) as error:  # a damaged or foreign version: one line, no traceback
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"[pipelines] {args.domain} {args.version} exported to {bundle}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
