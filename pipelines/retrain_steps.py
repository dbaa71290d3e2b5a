"""What every retraining step shares: exit codes, the resolved config, and
running one runner command (``pipelines.run``) in this process or as a child.

Nothing here imports torch or Lightning at import time: taking the registry lock, and exiting when
it is held, never waits for them.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import subprocess
import sys
from enum import IntEnum
from pathlib import Path
from typing import Any


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

    buffer, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(errors):
        try:
            run_main([domain, "fit", *runner_args, "--print_config"])
        except SystemExit as stop:
            if stop.code not in (0, None):  # the runner's own reason, in one line (not its usage block)
                said = errors.getvalue().strip().splitlines()
                start = next((i for i, line in enumerate(said) if "error" in line.lower()), max(len(said) - 1, 0))
                reason = " ".join(" ".join(said[start:]).split())[:800] or f"exit {stop.code}"
                raise RetrainError(ExitCode.USAGE, f"the runner rejected the options: {reason}") from None
    sys.stderr.write(errors.getvalue())  # its warnings, when it accepted them
    config = yaml.safe_load(buffer.getvalue())
    if not isinstance(config, dict) or "data" not in config or "model" not in config:
        raise RetrainError(ExitCode.FAILED, f"could not resolve the {domain} config: --print_config gave {buffer.getvalue()[:500]!r}")
    return config


# ----- running the runner ----------------------------------------------------------------------
#: variables of a distributed launch (and of an outer run): a child started without a launcher must not see them
LAUNCH_VARIABLES = (
    "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE",
    "PIPELINES_RUN_ID", "WANDB_SERVICE",
)  # fmt: skip


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


#: seconds a training child gets to write ``last.ckpt`` and exit after this process is stopped
STOP_GRACE_S = 60


def run_step(args: list[str], launcher: list[str] | None = None, job_type: str = "retrain", child: bool = False, group: str | None = None) -> None:
    """Run one runner command, ``python -m pipelines.run ARGS --wandb_group G --wandb_job_type T``.

    ``child`` (or a ``launcher`` such as ``srun``): as a child process, without the variables of a
    distributed launch unless a launcher starts it; DDP workers Lightning launches re-run that same
    command line. A stop of this process (SIGTERM, Ctrl+C) is passed on to the child, which writes
    ``last.ckpt`` and exits. Otherwise (single-process evaluations) in this process. A non-zero
    exit of the runner raises :class:`RetrainError`.
    """
    args = [*args, "--wandb_group", group or f"retrain-{args[0]}", "--wandb_job_type", job_type]
    print(f"[retrain] python -m pipelines.run {shlex.join(args)}", file=sys.stderr)
    if launcher or child:
        child_env = dict(os.environ)
        for name in LAUNCH_VARIABLES if not launcher else ():
            child_env.pop(name, None)
        # without a launcher the child dies with this process (pipelines.child_run); a launcher owns its tasks
        entry = ["pipelines.run"] if launcher else ["pipelines.child_run", f"--parent={os.getpid()}"]
        command = [*(launcher or []), sys.executable, "-m", *entry, *args]
        process = subprocess.Popen(command, env=child_env)
        try:
            code = process.wait()
        except BaseException:  # this attempt is stopping: the child stops too, keeping its last checkpoint
            from pipelines.stops import stop_process

            stop_process(process, STOP_GRACE_S)
            raise
        if code != 0:
            raise RetrainError(ExitCode.FAILED, f"{shlex.join(command)} exited with {code}")
        return
    from pipelines.run import main as run_main

    try:
        run_main(args)
    except SystemExit as stop:
        if type(stop).__name__ == "SIGTERMException":  # Lightning turns SIGTERM during fit into this SystemExit
            raise RetrainError(ExitCode.FAILED, f"python -m pipelines.run {shlex.join(args)} was terminated (SIGTERM)") from None
        if stop.code not in (0, None):
            raise RetrainError(ExitCode.FAILED, f"python -m pipelines.run {shlex.join(args)} exited with {stop.code}") from None


def write_yaml(path: Path, payload: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path
