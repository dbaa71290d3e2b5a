"""Registry upkeep, run by every writer under the lock: orphan versions and retention.

- **Orphans**: a version is written before the champion pointer moves and the history row is
  appended; a kill in between leaves a version no history row names. Its ``metadata.json`` holds
  the decision the attempt had reached (``decision``: promote or not, against which champion), so
  the next call finishes the job: it promotes the orphan when the attempt had decided to and the
  champion is still the one it beat, and records the attempt either way. The same data is then
  "nothing new" instead of being retrained.
- **Preflight** (:func:`check_writable`): a read-only or full registry is refused before training.
- **Retention** (``--keep N`` / ``registry gc --keep N``): keeps the newest ``N`` versions, the
  champion, its whole rollback chain and every aliased version; removes the other versions, the
  run folders of this registry's own attempts (recorded in its history) other than the newest ``N``
  and those of kept versions, and evaluation snapshots no longer pinned. Any other folder of the runs
  folder (another registry's attempts, a person's runs) is never touched, whatever its name or age. A removed version is first renamed to a ``.tmp-*`` name (which every
  reader ignores and the next writer deletes), so a kill mid-removal leaves no half version.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from pipelines.model_registry import TMP_PREFIX, ModelRegistry, RegistryError

ATTEMPT_PREFIX = "retrain-"
#: free space a write needs beyond twice the largest version (a full disk is refused before training)
MIN_FREE_BYTES = 64 << 20


def check_writable(registry: ModelRegistry, need_bytes: int = 0) -> None:
    """Raise :class:`RegistryError` (one line) unless the registry can take a new version now:
    its folders are writable (a real probe file, so read-only mounts are caught too) and the
    disk has room for ``need_bytes`` plus twice the largest version plus :data:`MIN_FREE_BYTES`."""
    existing = registry.root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    targets = [p for p in (registry.path, registry.versions_dir) if p.is_dir()] or [existing]
    for folder in targets:
        probe = folder / f".write-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise RegistryError(f"registry {folder} is not writable ({error.strerror}): fix its permissions or mount before retraining") from None
    largest = max((sum(f.stat().st_size for f in (registry.versions_dir / v).iterdir()) for v in registry.versions()), default=0)
    free = shutil.disk_usage(existing if not registry.path.is_dir() else registry.path).free
    needed = need_bytes + 2 * largest + MIN_FREE_BYTES
    if free < needed:
        raise RegistryError(f"registry {registry.root} has {free >> 20} MiB free, a new version needs about {needed >> 20} MiB: free space (e.g. `registry {registry.domain} gc --keep N`)")


def recorded_versions(registry: ModelRegistry) -> set[str]:
    """Versions some history row names as its challenger."""
    return {str((row.get("challenger") or {}).get("version")) for row in registry.history()}


def reconcile_orphans(registry: ModelRegistry) -> list[dict[str, Any]]:
    """Record (and, when the attempt had decided so, promote) versions no history row names."""
    rows = []
    known = recorded_versions(registry)
    for version in registry.versions():
        if version in known:
            continue
        try:
            meta = registry.verify_version(version)
        except RegistryError as error:
            row = {"decision": "orphan-corrupt", "domain": registry.domain, "challenger": {"version": version}, "error": str(error), "reconciled": True}
            registry.append_history(row)
            rows.append(row)
            continue
        intent = meta.get("decision") or {}
        against = intent.get("against")
        champion = registry.champion()
        if intent.get("promote") and champion == version:
            decision, reason = "promoted", "the pointer had moved before the interruption"
        elif intent.get("promote") and champion == against:
            registry.set_champion(version, f"retrain {meta.get('attempt')} (promotion completed after an interruption): {intent.get('reason')}")
            decision, reason = "promoted", "promotion completed after an interruption"
        else:
            decision = "rejected"
            reason = "rejected before the interruption" if not intent.get("promote") else f"champion changed to {champion} since (was {against})"
        row = {
            "attempt": meta.get("attempt"), "domain": registry.domain, "decision": decision, "reconciled": True,
            "reason": f"{intent.get('reason')} [{reason}]", "fingerprint": meta.get("fingerprint"), "metric": meta.get("metric"),
            "mode": meta.get("mode"), "run_dir": meta.get("run_dir"), "git_commit": meta.get("git_commit"),
            "challenger": {"version": version, "score": meta.get("score"), "metrics": meta.get("metrics")},
            "champion": {"version": against, "score": intent.get("champion_score")},
        }  # fmt: skip
        registry.append_history(row)
        rows.append(row)
    return rows


def _attempt_of(folder_name: str) -> str:
    return folder_name.split("-eval-")[0]


def own_attempts(registry: ModelRegistry) -> set[str]:
    """The attempt ids this registry recorded (its history rows and its versions' metadata): the only run
    folders retention may remove. A folder of another registry, a person's run or an attempt this registry
    never recorded (killed before its row) is never removed, whatever its name or age."""
    attempts = {str(row["attempt"]) for row in registry.history() if row.get("attempt")}
    attempts |= {str(row["run_dir"]).rstrip("/").rpartition("/")[2] for row in registry.history() if row.get("run_dir")}
    for version in registry.versions():
        attempt = registry.metadata(version).get("attempt")
        if attempt:
            attempts.add(str(attempt))
    return attempts


def prune(registry: ModelRegistry, keep: int, runs_domain_dirs: list[Path], current_attempt: str | None = None) -> dict[str, Any]:
    """Apply the retention policy (module docstring); return what was removed."""
    if keep < 1:
        raise ValueError(f"--keep {keep}: keep at least 1 version")
    versions = registry.versions()
    protected = set(registry.rollback_chain()) | set(registry.aliases().values()) | set(versions[-keep:])
    removed = []
    for version in versions:
        if version in protected:
            continue
        doomed = registry.versions_dir / f"{TMP_PREFIX}removed-{version}-{os.getpid()}"
        os.rename(registry.versions_dir / version, doomed)  # atomic: the version is gone for every reader
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(version)
    kept_attempts = {registry.metadata(v).get("attempt") for v in registry.versions()} | {current_attempt}
    own = own_attempts(registry)
    folders: dict[str, list[Path]] = {}
    for domain_dir in {d.resolve() for d in runs_domain_dirs if d.is_dir()}:
        for folder in domain_dir.iterdir():
            # only this registry's own attempts: a runs folder is shared (other registries' attempts, a person's runs)
            if folder.is_dir() and not folder.is_symlink() and folder.name.startswith(ATTEMPT_PREFIX) and _attempt_of(folder.name) in own:
                folders.setdefault(_attempt_of(folder.name), []).append(folder)
    newest = sorted(folders, key=lambda a: max(f.stat().st_mtime for f in folders[a]))[-keep:]
    deleted_runs = []
    for attempt, paths in folders.items():
        if attempt in kept_attempts or attempt in newest:
            continue
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
            deleted_runs.append(path.name)
    snapshots = []
    pinned = {str(Path(p).parent.name) for p in (registry.evaluation() or {}).get("files", {})}
    snapshot_root = registry.path / "evaluation"
    if snapshot_root.is_dir():
        for folder in snapshot_root.iterdir():
            if folder.name not in pinned:
                shutil.rmtree(folder, ignore_errors=True)
                snapshots.append(folder.name[:12])
    result = {"removed": removed, "run_folders": sorted(deleted_runs), "snapshots": snapshots}
    if removed or deleted_runs or snapshots:
        registry.append_history({"decision": "pruned", "domain": registry.domain, "keep": keep, **result})
    return result


def known_runs_dirs(registry: ModelRegistry) -> list[Path]:
    """Run folders' domain folders the history names (where retention looks for attempt folders)."""
    return sorted({Path(row["run_dir"]).parent for row in registry.history() if row.get("run_dir")})
