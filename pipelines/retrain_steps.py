"""What every retraining step shares: exit codes, the resolved config and its fingerprint, and
running one runner command (``pipelines.run``) in this process or as a child.

Nothing here imports torch or Lightning at import time: taking the registry lock, and exiting when
it is held, never waits for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
from enum import IntEnum
from pathlib import Path
from typing import Any

from pipelines.model_registry import sha256_file

STEP_ENV = "PIPELINES_RETRAIN_STEP"


class ExitCode(IntEnum):
    """What a scheduler can act on."""

    PROMOTED = 0  #: a new champion is in place
    FAILED = 1  #: something broke (training crashed or diverged, unwritable registry, ...): retry or alert
    USAGE = 2  #: bad command line (unknown metric or floor name, bad option): fix the job, retrying will not help
    KEPT_CHAMPION = 3  #: a challenger was trained but not promoted (not better by the margin, or below a floor)
    NOTHING_NEW = 4  #: the data fingerprint equals the champion's: nothing was trained
    LOCKED = 5  #: another retrain (or registry change) of this domain holds the lock: nothing was done


class RetrainError(Exception):
    """Ends an attempt with an exit code and a message."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# ----- config and fingerprint ------------------------------------------------------------------
def resolve_config(domain: str, runner_args: list[str]) -> dict[str, Any]:
    """The config a ``fit`` with these options would use, resolved by the runner's own parser."""
    import yaml

    from pipelines.run import main as run_main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            run_main([domain, "fit", *runner_args, "--print_config"])
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise RetrainError(ExitCode.USAGE, f"the runner rejected the options {runner_args}") from None
    config = yaml.safe_load(buffer.getvalue())
    if not isinstance(config, dict) or "data" not in config or "model" not in config:
        raise RetrainError(ExitCode.FAILED, f"could not resolve the {domain} config: --print_config gave {buffer.getvalue()[:500]!r}")
    return config


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


# ----- running the runner ----------------------------------------------------------------------
#: variables of a distributed launch: a single-process evaluation child must not see them
LAUNCH_VARIABLES = (
    "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE",
    "PIPELINES_RUN_ID", "WANDB_SERVICE",
)  # fmt: skip


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def run_step(args: list[str], launcher: list[str] | None = None, job_type: str = "retrain", fresh_process: bool = False) -> None:
    """Run one runner command (``pipelines.run.main(args)``): in this process, as a child behind
    ``launcher`` (e.g. ``srun``), or (``fresh_process``) as a plain single-process child without the
    distributed-launch variables. A non-zero exit of the runner raises :class:`RetrainError`."""
    env = {"PIPELINES_JOB_TYPE": job_type, STEP_ENV: json.dumps(args)}
    env["PIPELINES_WANDB_GROUP"] = os.environ.get("PIPELINES_WANDB_GROUP") or f"retrain-{args[0]}"
    print(f"[retrain] python -m pipelines.run {shlex.join(args)}", file=sys.stderr)
    if launcher or fresh_process:
        child_env = {**os.environ, **env}
        for name in (STEP_ENV, *(LAUNCH_VARIABLES if fresh_process else ())):
            child_env.pop(name, None)
        command = [*(launcher or []), sys.executable, "-m", "pipelines.run", *args]
        code = subprocess.run(command, env=child_env).returncode
        if code != 0:
            raise RetrainError(ExitCode.FAILED, f"{shlex.join(command)} exited with {code}")
        return
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # DDP workers that Lightning launches inherit the step they belong to
    try:
        from pipelines.run import main as run_main

        run_main(args)
    except SystemExit as stop:
        if type(stop).__name__ == "SIGTERMException":  # Lightning turns SIGTERM during fit into this SystemExit
            raise RetrainError(ExitCode.FAILED, f"python -m pipelines.run {shlex.join(args)} was terminated (SIGTERM)") from None
        if stop.code not in (0, None):
            raise RetrainError(ExitCode.FAILED, f"python -m pipelines.run {shlex.join(args)} exited with {stop.code}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_yaml(path: Path, payload: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path
