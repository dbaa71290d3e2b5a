"""Run folders: ``runs/<domain>/<run-id>/`` holds everything one run produced.

Layout::

    runs/healthcare/20261125-101500-3f2a9c/
        config.yaml         resolved config of fit (LightningCLI); config-<command>.yaml for the others (config-predict-2.yaml, ... beside predictions-2.csv, ...)
        provenance.json     seed, git commit, package versions, command line of every invocation
        checkpoints/        best.ckpt, last.ckpt
        metrics.jsonl       one line per epoch (train/*, val/*) and per test (test/*)
        summary.json        best checkpoint, best score, test metrics
        plots/              PNGs (confusion matrix, ROC, sample grids...)
        predictions.csv     written by ``predict`` (predictions-2.csv, ... by later calls; ``--output`` names it)
        wandb/              the W&B run (offline unless configured otherwise)

Commands on an existing run reuse what it was fitted with: ``test``/``validate``/``predict`` with
``--run_id`` (or a checkpoint inside the run folder) take the run's ``model`` and ``data`` config,
and ``fit --ckpt_path last`` (resuming) takes its whole config, so nobody has to retype the data
options of a run; options on the command line still win (see :func:`saved_config_sections`).

The run id is shared by every process of a run: it comes from ``--run_id``, else from the
``PIPELINES_RUN_ID`` variable (set by rank zero so that DDP workers launched as sub-processes
inherit it), else from the SLURM job id (so a requeued job resumes in the same folder), else it is
made from the time and a random suffix.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines.files import write_json_atomic, write_text_atomic

RUN_ID_ENV = "PIPELINES_RUN_ID"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"
TRACKED_PACKAGES = (
    "torch", "lightning", "torchmetrics", "jsonargparse", "wandb", "numpy", "pandas",
    "monai", "albumentations", "transformers",
)  # fmt: skip


@dataclass(frozen=True)
class RunFolder:
    """Where a run lives and which checkpoint (if any) it starts from."""

    domain: str
    run_id: str
    path: Path
    ckpt_path: str | None

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _launcher_run_id(environ: dict[str, str]) -> str | None:
    if environ.get(RUN_ID_ENV):
        return environ[RUN_ID_ENV]
    if environ.get("SLURM_JOB_ID") and environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return f"slurm-{environ['SLURM_JOB_ID']}"
    rdzv = environ.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    return None


def _latest_run_with(domain_dir: Path, checkpoint: str) -> Path | None:
    candidates = [p for p in domain_dir.glob(f"*/{CHECKPOINT_DIR}/{checkpoint}") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime).parents[1] if candidates else None


def resolve_run(
    domain: str,
    runs_dir: str | Path,
    run_id: str | None,
    ckpt_path: str | None,
    environ: dict[str, str] | None = None,
) -> RunFolder:
    """Pick the run folder and resolve ``ckpt_path`` aliases.

    ``ckpt_path="last"`` / ``"best"`` mean that checkpoint of ``run_id`` (or, without a run id, of
    the newest run of this domain that has one) and continue in that run's folder; when none exists
    yet, ``last`` starts a fresh run (Lightning #20347) while ``best`` is an error. A checkpoint file
    inside ``runs_dir/<domain>/<id>/`` also continues run ``<id>``.

    Example:
        >>> run = resolve_run("healthcare", "/tmp/nowhere", None, "last", environ={})
        >>> run.ckpt_path is None
        True
    """
    environ = dict(os.environ) if environ is None else environ
    domain_dir = Path(runs_dir) / domain
    run_id = run_id or _launcher_run_id(environ)
    resolved = ckpt_path
    if ckpt_path in ("last", "best"):
        name = LAST_CHECKPOINT if ckpt_path == "last" else BEST_CHECKPOINT
        folder = domain_dir / run_id if run_id else _latest_run_with(domain_dir, name)
        candidate = folder / CHECKPOINT_DIR / name if folder else None
        if candidate is not None and candidate.is_file():
            resolved, run_id = str(candidate), folder.name
        elif ckpt_path == "last":
            resolved = None  # the caller says what that means (fit: a fresh run)
        else:
            raise ValueError(f"--ckpt_path best: no {name} found under {folder or domain_dir}")
    elif ckpt_path:
        path = Path(ckpt_path).resolve()
        if not path.is_file():
            raise ValueError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        if not run_id and path.parent.name == CHECKPOINT_DIR and path.parents[2] == domain_dir.resolve():
            run_id = path.parents[1].name
        resolved = str(path)
    run_id = run_id or new_run_id()
    return RunFolder(domain=domain, run_id=run_id, path=domain_dir / run_id, ckpt_path=resolved)


def default_checkpoint(domain: str, runs_dir: str | Path, run_id: str | None, command: str) -> tuple[str, str]:
    """``(alias, path)`` of the checkpoint ``test``/``validate``/``predict`` use without ``--ckpt_path``: the run's
    ``best.ckpt``, else its ``last.ckpt`` (without ``run_id``: the newest run's, as ``--ckpt_path best`` finds it).
    ``ValueError`` when there is none: they scored an untrained model, and ``test`` replaced the run's recorded test
    metrics with its (trial finding).

    Example:
        >>> default_checkpoint("healthcare", "/tmp/nowhere", None, "predict")
        Traceback (most recent call last):
        ...
        ValueError: healthcare predict: no --ckpt_path given and no best.ckpt or last.ckpt under /tmp/nowhere/healthcare; predict needs trained weights (--ckpt_path best|last|FILE, with --run_id RUN): without them it would score an untrained model
    """
    for alias in ("best", "last"):
        try:
            run = resolve_run(domain, runs_dir, run_id, alias)
        except ValueError:
            continue
        if run.ckpt_path is not None:
            return alias, run.ckpt_path
    where = Path(runs_dir) / domain / (run_id or "")
    raise ValueError(
        f"{domain} {command}: no --ckpt_path given and no best.ckpt or last.ckpt under {str(where).rstrip('/')}; {command} needs trained "
        "weights (--ckpt_path best|last|FILE, with --run_id RUN): without them it would score an untrained model"
    )


def git_commit(cwd: Path | None = None) -> str:
    """The commit of the code that runs (with ``-dirty`` when the tree has changes), or ``unknown``."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def record_provenance(run: RunFolder, subcommand: str, seed: Any, hardware: str) -> dict[str, Any]:
    """Append this invocation to ``provenance.json`` (call on rank zero only)."""
    run.path.mkdir(parents=True, exist_ok=True)
    path = run.path / "provenance.json"
    record = json.loads(path.read_text()) if path.is_file() else {"domain": run.domain, "run_id": run.run_id}
    record.setdefault("invocations", []).append(
        {
            "subcommand": subcommand,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv,
            "seed": seed,
            "ckpt_path": run.ckpt_path,
            "git_commit": git_commit(),
            "packages": package_versions(),
            "host": platform.node(),
            "hardware": hardware,
        }
    )
    write_json_atomic(path, record)
    return record


#: Sections of a run's saved config that a later command on the run takes over.
REUSED_SECTIONS = {"fit": ("seed_everything", "trainer", "model", "data", "compile"), "other": ("model", "data")}


def saved_config_sections(run: RunFolder, subcommand: str) -> tuple[Path, dict[str, Any]] | None:
    """The saved config of the run a command continues or uses, limited to :data:`REUSED_SECTIONS`.

    ``run`` is the folder resolved from the fully parsed command (CLI options, ``--config`` files and
    ``PIPELINES_*`` variables alike). ``fit`` reuses a config only when it resumes from a checkpoint;
    the other sub-commands whenever the run folder has a ``config.yaml``. Returns ``(path, sections)``.

    Example:
        >>> run = RunFolder("healthcare", "no-such-run", Path("/tmp/nowhere/healthcare/no-such-run"), None)
        >>> saved_config_sections(run, "test") is None
        True
    """
    import yaml

    if subcommand == "fit" and not run.ckpt_path:
        return None
    path = run.path / "config.yaml"
    if not path.is_file():
        return None
    saved = yaml.safe_load(path.read_text()) or {}
    keep = REUSED_SECTIONS["fit" if subcommand == "fit" else "other"]
    return path, {key: saved[key] for key in keep if key in saved}


def record_in_config(run: RunFolder, values: dict[tuple[str, ...], Any]) -> Path:
    """Set values of the run's saved ``config.yaml`` (keys as paths: ``("data", "batch_size")``), written
    atomically; a value found while fitting (the Tuner's batch size or learning rate) is then what a
    resumed run, ``test`` and ``predict`` use. Returns the file's path."""
    import yaml

    path = run.path / "config.yaml"
    config = yaml.safe_load(path.read_text())
    for keys, value in values.items():
        section = config
        for key in keys[:-1]:
            section = section[key]
        section[keys[-1]] = value
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
    return path


class RunFolderBusy(RuntimeError):
    """Another command holds the run folder's lock."""


class RunLock:
    """An exclusive ``fcntl`` lock on ``<run folder>/.lock`` for as long as a command uses the folder.

    Two commands writing one run folder at once interleave ``metrics.jsonl``, open two W&B runs and
    leave a config that disagrees with the summary; the second is refused instead. The kernel
    releases the lock when the process dies, so a killed run never leaves the folder locked.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> first = RunLock(folder, "fit")
        >>> RunLock(folder, "test")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        pipelines.run_folder.RunFolderBusy: run folder ... is in use by pid ...
        >>> first.release(); RunLock(folder, "test").release()
    """

    def __init__(self, folder: Path, subcommand: str) -> None:
        import fcntl

        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / ".lock"
        self._handle = open(self.path, "a+")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "another process"
            self._handle.close()
            raise RunFolderBusy(f"run folder {folder} is in use by {holder}; wait for it to end, or use another --run_id") from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"pid {os.getpid()} on {platform.node()} ({subcommand} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')})\n")
        self._handle.flush()

    def release(self) -> None:
        if not self._handle.closed:
            self._handle.close()  # closing the file releases the flock
