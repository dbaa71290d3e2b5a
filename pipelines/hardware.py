"""Turn "what is here" into Trainer settings, and say what was chosen.

Rules (each applies only where the user left Lightning's default; explicit settings always win):

- no GPU: CPU, 32-bit precision, one process;
- one GPU: ``bf16-mixed`` where the GPU supports it, otherwise ``16-mixed``; cuDNN benchmark on;
- several GPUs (or several nodes): DDP with synchronised batch-norm; Lightning picks its SLURM or
  torchrun cluster environment from the environment variables those launchers set;
- a SLURM or torchrun launch whose process count differs from ``devices x num_nodes`` fails at once
  with the numbers, instead of hanging at the first collective (Lightning #20391);
- ``one_process`` (``predict``: one predictions file, in the input's order): ``devices: auto`` is one
  device, and asking for more than one process (devices, nodes, or a launcher's) is refused.

Example:
    >>> plan = plan_hardware({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}, environ={})
    >>> plan.settings["precision"]
    '32-true'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.errors import InputError

_DEFAULTS = {"accelerator": "auto", "devices": "auto", "strategy": "auto", "precision": None, "num_nodes": 1}


@dataclass
class HardwarePlan:
    """Trainer keyword arguments chosen for this machine, and a one-line reason for the log."""

    settings: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    processes: int = 1  # devices x nodes: the DDP processes the run will start


def count_devices(devices: Any, available: int) -> int:
    if devices in ("auto", -1, "-1", None):
        return max(available, 1)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    return int(devices)


def preflight_launch(processes: int, environ: Mapping[str, str]) -> None:
    """Fail fast when a cluster launcher started a different number of processes than configured."""
    slurm_tasks = environ.get("SLURM_NTASKS")
    interactive = environ.get("SLURM_JOB_NAME") in ("bash", "interactive")
    if slurm_tasks and not interactive and int(slurm_tasks) != processes:
        raise ValueError(
            f"SLURM launched {slurm_tasks} tasks but the Trainer expects devices x num_nodes = {processes}; "
            "set --trainer.devices to the tasks per node and --trainer.num_nodes to the node count "
            "(#SBATCH --ntasks-per-node / --nodes)"
        )
    world_size = environ.get("WORLD_SIZE")
    if world_size and environ.get("TORCHELASTIC_RUN_ID") and int(world_size) != processes:
        raise ValueError(
            f"torchrun started WORLD_SIZE={world_size} processes but the Trainer expects devices x num_nodes = "
            f"{processes}; pass --trainer.devices=<nproc_per_node> --trainer.num_nodes=<nnodes>"
        )


def launched_processes(environ: Mapping[str, str]) -> int:
    """The processes a SLURM (non-interactive) or torchrun launch started, 1 without a launcher."""
    if environ.get("SLURM_NTASKS") and environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return int(environ["SLURM_NTASKS"])
    if environ.get("WORLD_SIZE") and environ.get("TORCHELASTIC_RUN_ID"):
        return int(environ["WORLD_SIZE"])
    return 1


def refuse_several_processes(what: str, processes: int, launched: int) -> None:
    """Refuse a command that runs in one process when more were asked for (``what``: the command).

    Example:
        >>> refuse_several_processes("predict", 2, 1)
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: predict runs in one process, but the trainer options ask for 2 (--trainer.devices x --trainer.num_nodes); under DDP each process would predict its own share of the inputs into files of its own. Run it with --trainer.devices 1 (and --trainer.num_nodes 1), outside torchrun or a multi-task SLURM step
    """
    if processes <= 1 and launched <= 1:
        return
    asked = f"the trainer options ask for {processes} (--trainer.devices x --trainer.num_nodes)" if processes > 1 else f"it was launched as {launched} processes (torchrun or SLURM)"
    raise InputError(
        f"{what} runs in one process, but {asked}; under DDP each process would predict its own share of the inputs into files of its own. "
        "Run it with --trainer.devices 1 (and --trainer.num_nodes 1), outside torchrun or a multi-task SLURM step"
    )


def plan_hardware(trainer_config: Mapping[str, Any], environ: Mapping[str, str] | None = None, one_process: str | None = None) -> HardwarePlan:
    """Fill accelerator, devices, strategy, precision and sync_batchnorm where the user did not.

    Args:
        trainer_config: the ``trainer`` section of the resolved config.
        environ: environment variables to read (defaults to ``os.environ``).
        one_process: the command (``"predict"``) when it must run in one process: ``devices: auto`` is
            one device and more processes are refused (:func:`refuse_several_processes`).

    Example:
        >>> plan_hardware({"accelerator": "cpu", "devices": 2}, environ={}, one_process="predict")
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: predict runs in one process, but the trainer options ask for 2 (--trainer.devices x --trainer.num_nodes); under DDP each process would predict its own share of the inputs into files of its own. Run it with --trainer.devices 1 (and --trainer.num_nodes 1), outside torchrun or a multi-task SLURM step
    """
    environ = os.environ if environ is None else environ
    cfg = {key: trainer_config.get(key, default) for key, default in _DEFAULTS.items()}
    gpus = torch.cuda.device_count()
    accelerator = cfg["accelerator"]
    if accelerator == "auto":
        accelerator = "gpu" if gpus else "cpu"
    on_gpu = accelerator in ("gpu", "cuda")
    devices = 1 if one_process and cfg["devices"] == "auto" else count_devices(cfg["devices"], gpus if on_gpu else 1)
    processes = devices * int(cfg["num_nodes"] or 1)
    if one_process:
        refuse_several_processes(one_process, processes, launched_processes(environ))
    preflight_launch(processes, environ)

    settings: dict[str, Any] = {"accelerator": accelerator, "devices": cfg["devices"]}
    if cfg["devices"] == "auto":
        settings["devices"] = devices
    strategy = cfg["strategy"]
    if strategy == "auto" and processes > 1:
        strategy = "ddp"
    settings["strategy"] = strategy
    precision = cfg["precision"]
    if precision is None:
        if on_gpu:
            precision = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            precision = "32-true"
    settings["precision"] = precision
    if on_gpu and processes > 1 and not trainer_config.get("sync_batchnorm"):
        settings["sync_batchnorm"] = True
    if on_gpu and trainer_config.get("benchmark") is None:
        settings["benchmark"] = True  # cuDNN autotuning: the domains' shapes are fixed per run

    where = "SLURM" if environ.get("SLURM_NTASKS") else "torchrun" if environ.get("TORCHELASTIC_RUN_ID") else "local"
    summary = (
        f"hardware: {accelerator} x {devices} device(s) x {cfg['num_nodes']} node(s) [{where} launch], "
        f"strategy={strategy}, precision={precision}"
        + (", sync_batchnorm" if settings.get("sync_batchnorm") else "")
        + (f" (GPUs visible: {gpus})" if gpus else " (no GPU visible)")
    )
    return HardwarePlan(settings=settings, summary=summary, processes=processes)
