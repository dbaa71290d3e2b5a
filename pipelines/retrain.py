"""``python -m pipelines.retrain DOMAIN [--registry DIR] [retrain options] [runner options]``.

One command for a scheduler (cron, a Kubernetes CronJob, SLURM, Airflow): safe to call at any
time, it never puts a worse or half-written model in production. Works for every registered
domain with no domain code: it only uses the runner (:func:`pipelines.run.main`), the domain's
``DomainSpec.monitor``/``mode`` and the Lightning checkpoint.

Steps:

1. **Lock** ``REGISTRY/<domain>/.lock`` with ``fcntl.flock`` (released by the kernel if the process
   dies). Held by someone else: exit :attr:`ExitCode.LOCKED` at once, before any heavy import.
2. **Fingerprint** the training data: the runner resolves the config exactly as a training run
   would (domain defaults < ``--config`` files < options < ``PIPELINES_*`` variables, through
   ``--print_config``); every string among the ``data`` and ``model`` values that names an
   existing file or folder is content-hashed (sha256, folders recursively), and the digest covers
   those hashes plus the resolved ``data`` and ``model`` sections. Embedded synthetic data is
   described entirely by its config, so there the config hash is the fingerprint. Equal to the
   champion's, or to a challenger already rejected against the same champion: exit
   :attr:`ExitCode.NOTHING_NEW` without training (``--force`` trains anyway).
3. **Train** a challenger with the runner (``pipelines.run DOMAIN fit``) in ``runs/<domain>/<id>/``.
   ``--warm_start`` loads the champion's weights (safetensors, weights only: no optimizer state)
   with the :class:`WarmStart` callback before the first step.
4. **Evaluate** challenger and champion on the registry's evaluation set. Design: at the first
   retrain the registry pins an evaluation *data config* (``evaluation.json``: the data section of
   that first run, or of ``--eval_config FILE.yaml``) together with the sha256 of every file it
   points at. A model is scored by the runner's own ``test`` sub-command with that pinned data
   config, the model's own model config and checkpoint (so its fitted preprocessing is restored
   from the checkpoint), and this attempt's trainer settings (the same for both models). The score
   is the domain's primary metric ``spec.monitor`` read at test time (``val/auroc`` ->
   ``test/auroc``), compared in the direction ``spec.mode``. The test split of a data config is
   never trained on (the domain contract: train/val/test are disjoint); if the pinned files
   change on disk, the attempt fails instead of scoring on different data. Training on another
   source than the pinned one is allowed (new data); keeping that source free of the evaluation
   items is the data owner's job, since no generic check can see inside every format.
5. **Decide**: promote when the challenger beats the champion by more than ``--margin`` in the
   domain's direction and passes every ``--floor`` (e.g. ``--floor "test/auroc>=0.7"``); the first
   model only needs the floors. Every trained challenger becomes a registry version; promotion then
   moves the champion pointer (atomic, see :mod:`pipelines.model_registry`).
6. **Record** the attempt in ``history.jsonl``: time, fingerprint, metrics of both, decision, run
   folders, git commit. When W&B is online the version is also logged as a model artifact with
   aliases ``candidate`` (and ``champion`` when promoted), after the folder is updated.

Training and evaluation runs are W&B runs in group ``retrain-<domain>`` with job types
``retrain`` and ``retrain-eval`` (override with ``PIPELINES_WANDB_GROUP``).

Exit codes (:class:`ExitCode`): 0 promoted, 3 kept champion (challenger rejected), 4 nothing new,
5 locked, 1 failed, 2 bad command line.

Multi-GPU: the runner's own DDP works here (Lightning re-launches this command for each worker
rank; a worker sees ``PIPELINES_RETRAIN_STEP`` and only runs the runner step it belongs to).
Evaluations always run on one device in one process (no DistributedSampler padding: every model
sees exactly the same items); after a distributed training they run in a fresh child process. On a
SLURM allocation run this command once in the batch step and let ``--launcher srun`` start the
training step on every task (``deploy/retrain.sbatch``); a job requeued after preemption is the same
attempt (``retrain-slurm-<job id>``) and resumes its training from ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import operator
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import traceback
from enum import IntEnum
from pathlib import Path
from typing import Any

from pipelines.model_registry import (
    REGISTRY_ENV,
    ModelRegistry,
    RegistryError,
    RegistryLocked,
    default_registry,
    publish_to_wandb,
    sha256_file,
)

STEP_ENV = "PIPELINES_RETRAIN_STEP"
RESERVED_RUNNER_OPTIONS = ("--run_id", "--ckpt_path")
USAGE = "usage: python -m pipelines.retrain DOMAIN [--registry DIR] [--margin M] [--floor 'test/X>=V'] [--warm_start] [runner options: --config, --data.X, --model.X, --trainer.X, --runs_dir]"


class ExitCode(IntEnum):
    """What a scheduler can act on."""

    PROMOTED = 0  #: a new champion is in place
    FAILED = 1  #: something broke (training crashed, data changed under the evaluation set, ...): retry or alert
    USAGE = 2  #: bad command line: fix the job, retrying will not help
    KEPT_CHAMPION = 3  #: a challenger was trained but not promoted (not better by the margin, or below a floor)
    NOTHING_NEW = 4  #: the data fingerprint equals the champion's: nothing was trained
    LOCKED = 5  #: another retrain (or registry change) of this domain holds the lock: nothing was done


# ----- warm start ------------------------------------------------------------------------------
def _warm_start_class() -> type:
    import lightning.pytorch as pl

    class WarmStart(pl.Callback):
        """Load weights (a ``.safetensors`` state dict of the LightningModule) before training starts.

        Weights only: the optimizer, schedule and epoch counter start fresh. Tensors whose name or
        shape differs are left at their initialisation and reported. Usable with the plain runner::

            python -m pipelines.run healthcare --trainer.callbacks+=pipelines.retrain.WarmStart \\
                --trainer.callbacks.weights=registry/healthcare/versions/v0003/model.safetensors

        Args:
            weights: path of the ``.safetensors`` file.
        """

        def __init__(self, weights: str) -> None:
            self.weights = weights

        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            if stage != "fit":
                return
            from safetensors.torch import load_file

            path = Path(self.weights)
            if not path.is_file():
                raise FileNotFoundError(f"WarmStart: weights file {path} does not exist (expected a .safetensors state dict)")
            loaded = load_file(str(path))
            own = pl_module.state_dict()
            usable = {k: v for k, v in loaded.items() if k in own and own[k].shape == v.shape}
            pl_module.load_state_dict(usable, strict=False)
            skipped = sorted(set(own) - set(usable))
            print(f"[retrain] warm start from {path}: {len(usable)} tensor(s) loaded, {len(skipped)} kept at initialisation", file=sys.stderr)

    WarmStart.__module__ = __name__
    WarmStart.__qualname__ = "WarmStart"
    return WarmStart


def __getattr__(name: str) -> Any:
    """``pipelines.retrain.WarmStart`` is built on first use (PEP 562), so that taking the lock,
    and exiting when it is held, never waits for Lightning to import."""
    if name == "WarmStart":
        globals()["WarmStart"] = cls = _warm_start_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _path_values(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _path_values(v)]
    if isinstance(value, list):
        return [p for v in value for p in _path_values(v)]
    if isinstance(value, str) and value and len(value) < 4096 and "\n" not in value:
        with contextlib.suppress(OSError, ValueError):
            if Path(value).exists():
                return [value]
    return []


def _absolute_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _absolute_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute_paths(v) for v in value]
    return str(Path(value).resolve()) if _path_values(value) else value


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
    files = {value: hash_path(Path(value)) for value in sorted(set(_path_values(sections)))}
    canonical = json.dumps({"config": sections, "files": files}, sort_keys=True, default=str)
    return {"digest": hashlib.sha256(canonical.encode()).hexdigest(), "files": files}


def evaluation_metric_key(monitor: str) -> str:
    """The test-time name of a validation metric: ``val/auroc`` -> ``test/auroc``."""
    for prefix, replacement in (("val/", "test/"), ("val_", "test_")):
        if monitor.startswith(prefix):
            return replacement + monitor[len(prefix) :]
    raise RetrainError(ExitCode.FAILED, f"DomainSpec.monitor {monitor!r} does not start with 'val/': cannot name its test metric")


_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def parse_floor(text: str) -> tuple[str, str, float]:
    """``"test/auroc>=0.7"`` -> ``("test/auroc", ">=", 0.7)``."""
    for symbol in (">=", "<=", ">", "<"):
        if symbol in text:
            key, _, value = text.partition(symbol)
            try:
                return key.strip(), symbol, float(value)
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"--floor {text!r}: expected METRIC>=VALUE (or <=, >, <), e.g. 'test/auroc>=0.7'")


def is_improvement(challenger: float, champion: float, mode: str, margin: float) -> bool:
    """Whether ``challenger`` beats ``champion`` by more than ``margin`` in direction ``mode``.

    Example:
        >>> is_improvement(0.91, 0.90, "max", 0.005), is_improvement(0.91, 0.90, "max", 0.02), is_improvement(0.4, 0.5, "min", 0.0)
        (True, False, True)
    """
    if not (math.isfinite(challenger) and math.isfinite(champion)):
        return math.isfinite(challenger)
    gain = challenger - champion if mode == "max" else champion - challenger
    return gain > margin


# ----- the attempt -----------------------------------------------------------------------------
class RetrainError(Exception):
    """Ends an attempt with an exit code and a message."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


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


def _write_yaml(path: Path, payload: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path


class Attempt:
    """One retraining attempt of one domain (the caller holds the registry lock)."""

    def __init__(self, options: argparse.Namespace, runner_args: list[str]) -> None:
        from pipelines.registry import get_domain

        self.options = options
        self.runner_args = runner_args
        self.spec = get_domain(options.domain)
        self.registry = ModelRegistry(options.registry, self.spec.name)
        # a requeued SLURM job is the same attempt: it resumes its run folder from last.ckpt
        slurm_job = os.environ.get("SLURM_JOB_ID") if os.environ.get("SLURM_JOB_NAME") not in (None, "bash", "interactive") else None
        self.attempt_id = f"retrain-slurm-{slurm_job}" if slurm_job else "retrain-" + time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        self.test_key = evaluation_metric_key(self.spec.monitor)
        self.started = time.time()
        self.row: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attempt": self.attempt_id, "domain": self.spec.name,
            "metric": self.test_key, "mode": self.spec.mode, "margin": options.margin,
            "floors": [f"{k}{op}{v}" for k, op, v in options.floor], "argv": sys.argv,
        }  # fmt: skip

    def run(self) -> ExitCode:
        from pipelines.runs import git_commit

        self.row["git_commit"] = git_commit()
        removed = self.registry.remove_partial_versions()
        if removed:
            print(f"[retrain] removed interrupted version folders {removed} from {self.registry.versions_dir}", file=sys.stderr)
        self.config = config = resolve_config(self.spec.name, self.runner_args)
        print_ = fingerprint(config)
        self.row["fingerprint"], self.row["data_files"] = print_["digest"], print_["files"]
        champion = self.registry.champion()
        champion_meta = self.registry.verify_version(champion) if champion else None
        self.row["champion"] = {"version": champion}
        if not self.options.force:
            seen = self._already_decided(print_["digest"], champion, champion_meta)
            if seen:
                self.row["decision"] = "nothing-new"
                print(f"[retrain] nothing new: the data fingerprint {print_['digest'][:12]} {seen}; --force retrains anyway", file=sys.stderr)
                return ExitCode.NOTHING_NEW
        evaluation = self._evaluation_set(config)

        runs_dir = Path(config.get("runs_dir") or "runs")
        run_dir = runs_dir / self.spec.name / self.attempt_id
        self.row["run_dir"] = str(run_dir)
        train_args = [self.spec.name, "fit", *self.runner_args, "--run_id", self.attempt_id]
        if (run_dir / "checkpoints" / "last.ckpt").is_file():  # the same attempt, requeued after preemption
            train_args += ["--ckpt_path", "last"]
        if self.options.warm_start and champion:
            weights = self.registry.version_dir(champion) / "model.safetensors"
            train_args += ["--trainer.callbacks+=pipelines.retrain.WarmStart", f"--trainer.callbacks.weights={weights}"]
            self.row["warm_start"] = champion
        run_step(train_args, self.options.launcher)
        best = run_dir / "checkpoints" / "best.ckpt"
        if not best.is_file():
            raise RetrainError(ExitCode.FAILED, f"training finished without {best} (no validation ran? check --trainer.limit_val_batches)")

        challenger = self._score(best, config, run_dir, "challenger")
        self.row["challenger"] = challenger
        if champion:
            with_champion = run_dir / f"champion-{champion}.ckpt"
            self.registry.write_checkpoint(champion, with_champion)
            champion_config = self._version_config(champion)
            try:
                self.row["champion"] = {"version": champion, **self._score(with_champion, champion_config, run_dir, f"champion-{champion}")}
            finally:
                with_champion.unlink(missing_ok=True)
        decision, reason = self._decide(challenger, self.row["champion"] if champion else None)
        self.row["reason"] = reason
        print(f"[retrain] {reason}", file=sys.stderr)

        import yaml

        datamodule_key = self.spec.datamodule_class.rpartition(".")[2]
        model_class = config["model"].get("class_path") if isinstance(config["model"], dict) else None
        version = self.registry.add_version(
            best,
            yaml.safe_dump(config, sort_keys=False),
            {
                "fingerprint": print_["digest"], "data_files": print_["files"], "metric": self.test_key, "mode": self.spec.mode,
                "score": challenger["score"], "metrics": challenger["metrics"], "evaluation": evaluation["fingerprint"],
                "run_dir": str(run_dir), "attempt": self.attempt_id, "git_commit": self.row["git_commit"],
                "model_class": model_class or self.spec.model_class, "datamodule_class": self.spec.datamodule_class,
                "warm_start": self.row.get("warm_start"),
            },
            datamodule_key,
        )  # fmt: skip
        self.row["challenger"]["version"] = version
        if decision:
            self.registry.set_champion(version, f"retrain {self.attempt_id}: {reason}")
        self.row["decision"] = "promoted" if decision else "rejected"
        self.row["wandb"] = publish_to_wandb(
            self.registry, version, ["candidate", *(["champion"] if decision else [])], os.environ.get("PIPELINES_WANDB_GROUP") or f"retrain-{self.spec.name}"
        )
        return ExitCode.PROMOTED if decision else ExitCode.KEPT_CHAMPION

    def _already_decided(self, digest: str, champion: str | None, champion_meta: dict[str, Any] | None) -> str | None:
        """Why this fingerprint is nothing new: it is the champion's, or a challenger with it was
        already rejected against this same champion (so a nightly job does not retrain it forever)."""
        if champion_meta and champion_meta.get("fingerprint") == digest:
            return f"is the champion's ({champion})"
        for row in reversed(self.registry.history()):
            if row.get("decision") == "rejected" and row.get("fingerprint") == digest and (row.get("champion") or {}).get("version") == champion:
                return f"was already rejected against champion {champion} (attempt {row.get('attempt')}, {row.get('time')})"
        return None

    def _evaluation_set(self, config: dict[str, Any]) -> dict[str, Any]:
        """The pinned evaluation data config; pinned now on the first attempt. Fails if its files changed."""
        pinned = self.registry.evaluation()
        requested = resolve_config(self.spec.name, ["--config", str(self.options.eval_config)])["data"] if self.options.eval_config else None
        if pinned is None:
            data = _absolute_paths(requested if requested is not None else config["data"])  # valid from any working folder
            pinned = {"data": data, **{k: v for k, v in fingerprint({"data": data}).items()}}
            pinned["fingerprint"] = pinned.pop("digest")
            self.registry.pin_evaluation(pinned)
            print(f"[retrain] pinned the evaluation set (the test split of this data config) in {self.registry.path / 'evaluation.json'}", file=sys.stderr)
            return pinned
        if requested is not None and _absolute_paths(requested) != pinned["data"]:
            raise RetrainError(ExitCode.USAGE, f"--eval_config {self.options.eval_config} differs from the evaluation set pinned in {self.registry.path / 'evaluation.json'}; it never changes")
        for path, expected in pinned.get("files", {}).items():
            actual = hash_path(Path(path)) if Path(path).exists() else "missing"
            if actual != expected:
                raise RetrainError(
                    ExitCode.FAILED,
                    f"evaluation file {path} changed since it was pinned in {self.registry.path / 'evaluation.json'} "
                    f"(sha256 {expected[:12]} expected, found {actual[:12]}): restore it; the evaluation set must stay fixed",
                )
        return pinned

    def _distributed_training(self) -> bool:
        """Whether training ran in several processes (a launcher, or devices x num_nodes > 1): then each
        evaluation runs in a fresh single-process child, free of the training's process group."""
        from pipelines.hardware import _count_devices

        trainer = self.config["trainer"]
        accelerator = trainer.get("accelerator") or "auto"
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not _cuda_devices())
        devices = _count_devices(trainer.get("devices") or "auto", 1 if on_cpu else _cuda_devices())
        return bool(self.options.launcher) or devices * int(trainer.get("num_nodes") or 1) > 1

    def _version_config(self, version: str) -> dict[str, Any]:
        import yaml

        text = (self.registry.version_dir(version) / "config.yaml").read_text()
        return yaml.safe_load(text) or {}

    def _score(self, checkpoint: Path, model_config: dict[str, Any], run_dir: Path, label: str) -> dict[str, Any]:
        """Test ``checkpoint`` (with ``model_config``'s model section) on the pinned evaluation data."""
        config = self.config
        evaluation = self.registry.evaluation()
        assert evaluation is not None
        # one process on one device: no DistributedSampler padding, the same items for every model
        trainer = {**config["trainer"], "callbacks": None, "devices": 1, "num_nodes": 1, "strategy": "auto", "sync_batchnorm": False}
        eval_config = {"seed_everything": config.get("seed_everything"), "trainer": trainer, "model": model_config["model"], "data": evaluation["data"]}
        config_path = _write_yaml(run_dir / f"evaluation-{label}.yaml", eval_config)
        eval_id = f"{self.attempt_id}-eval-{label}"
        runs_dir = str(run_dir.parent.parent)
        args = [self.spec.name, "test", "--config", str(config_path), "--runs_dir", runs_dir, "--run_id", eval_id, "--ckpt_path", str(checkpoint)]
        run_step(args, job_type="retrain-eval", fresh_process=self._distributed_training())
        summary_path = Path(runs_dir) / self.spec.name / eval_id / "summary.json"
        try:
            metrics = json.loads(summary_path.read_text())["test"]
        except (OSError, KeyError, json.JSONDecodeError) as error:
            raise RetrainError(ExitCode.FAILED, f"evaluation of {label} wrote no test metrics to {summary_path}: {error}") from None
        if self.test_key not in metrics:
            raise RetrainError(ExitCode.FAILED, f"evaluation of {label}: {summary_path} has no {self.test_key} (has {sorted(metrics)})")
        print(f"[retrain] {label}: {self.test_key} = {metrics[self.test_key]:.4f} on the evaluation set", file=sys.stderr)
        return {"score": metrics[self.test_key], "metrics": metrics, "eval_run": str(summary_path.parent)}

    def _decide(self, challenger: dict[str, Any], champion: dict[str, Any] | None) -> tuple[bool, str]:
        metrics = challenger["metrics"]
        failed = []
        for key, symbol, value in self.options.floor:
            if key not in metrics:
                raise RetrainError(ExitCode.USAGE, f"--floor {key}{symbol}{value}: no metric {key} (the test metrics are {sorted(metrics)})")
            if not _OPERATORS[symbol](metrics[key], value):
                failed.append(f"{key}={metrics[key]:.4f} fails {symbol}{value}")
        if failed:
            return False, "rejected: " + "; ".join(failed)
        if champion is None:
            return True, f"promoted: first model, {self.test_key}={challenger['score']:.4f} passes the floors"
        better = is_improvement(challenger["score"], champion["score"], self.spec.mode, self.options.margin)
        comparison = f"{self.test_key} {challenger['score']:.4f} vs champion {champion['version']} {champion['score']:.4f} ({self.spec.mode}, margin {self.options.margin})"
        return better, ("promoted: " if better else "rejected: not better by the margin: ") + comparison

    def record(self, code: ExitCode, error: str | None = None) -> None:
        self.row.update(exit_code=int(code), duration_s=round(time.time() - self.started, 1))
        if error:
            self.row.update(decision=self.row.get("decision") or "failed", error=error)
        self.registry.append_history(self.row)


# ----- command line ----------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split retrain options from the runner options (everything else, passed on unchanged)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.retrain", usage=USAGE.removeprefix("usage: "), allow_abbrev=False, description=__doc__.split("\n\n")[1],
        epilog="exit codes: " + ", ".join(f"{int(code)} {code.name.lower().replace('_', ' ')}" for code in ExitCode)
        + ". Every other option goes to the runner (python -m pipelines.run DOMAIN --help lists them).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("domain")
    parser.add_argument("--registry", type=Path, default=None, help=f"registry folder (default: ${REGISTRY_ENV} or ./registry)")
    parser.add_argument("--margin", type=float, default=0.0, help="promote only when the challenger beats the champion by more than this, in the metric's direction (default 0: strictly better; a negative margin accepts a challenger at most that much worse, to prefer fresher data)")
    parser.add_argument("--floor", type=parse_floor, action="append", default=[], help="a test metric the challenger must pass, e.g. 'test/auroc>=0.7' (repeatable)")
    parser.add_argument("--warm_start", action="store_true", help="start training from the champion's weights (weights only)")
    parser.add_argument("--eval_config", type=Path, default=None, help="YAML whose data section is the evaluation set, pinned at the first retrain (default: the first run's data)")
    parser.add_argument("--launcher", type=shlex.split, default=None, help="command prefix that starts the training step as a child process on every task, e.g. 'srun' on SLURM")
    parser.add_argument("--force", action="store_true", help="train even when the fingerprint equals the champion's")
    options, runner_args = parser.parse_known_args(argv)
    for arg in runner_args:
        if arg.split("=")[0] in RESERVED_RUNNER_OPTIONS:
            parser.error(f"{arg.split('=')[0]} is chosen by retrain (one run folder per attempt)")
        if not arg.startswith("-") and runner_args.index(arg) == 0:
            parser.error(f"unexpected {arg!r}: retrain runs fit and test itself; give only options")
    options.registry = options.registry or default_registry()
    return options, runner_args


def main(argv: list[str] | None = None) -> int:
    """Run one retraining attempt; return its :class:`ExitCode`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get(STEP_ENV):  # a DDP worker Lightning launched from a retrain step: run that step only
        from pipelines.run import main as run_main

        run_main(json.loads(os.environ[STEP_ENV]))
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("exit codes: " + ", ".join(f"{int(code)} {code.name.lower().replace('_', ' ')}" for code in ExitCode))
        return 0 if argv else ExitCode.USAGE
    options, runner_args = parse_args(argv)
    from pipelines.registry import get_domain

    try:
        get_domain(options.domain)
    except ValueError as error:
        print(f"[retrain] error: {error}\n{USAGE}", file=sys.stderr)
        return ExitCode.USAGE
    registry = ModelRegistry(options.registry, options.domain)
    try:
        with registry.lock():
            previous = signal.signal(signal.SIGTERM, _terminated)  # a SIGTERM is recorded as a failed attempt
            try:
                return _attempt(options, runner_args)
            finally:
                signal.signal(signal.SIGTERM, previous)
    except RegistryLocked as error:
        print(f"[retrain] locked: {error}; nothing done (exit {int(ExitCode.LOCKED)})", file=sys.stderr)
        return ExitCode.LOCKED


def _terminated(signum: int, frame: Any) -> None:
    raise RetrainError(ExitCode.FAILED, "terminated (SIGTERM)")


def _attempt(options: argparse.Namespace, runner_args: list[str]) -> ExitCode:
    try:
        attempt = Attempt(options, runner_args)
    except (ValueError, RetrainError) as error:
        print(f"[retrain] error: {error}", file=sys.stderr)
        return getattr(error, "code", ExitCode.USAGE)
    try:
        code = attempt.run()
    except RetrainError as error:
        print(f"[retrain] {'usage' if error.code == ExitCode.USAGE else 'failed'}: {error}", file=sys.stderr)
        attempt.record(error.code, str(error))
        return error.code
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - every failure is recorded in the history
        traceback.print_exc()
        attempt.record(ExitCode.FAILED, f"{type(error).__name__}: {error}")
        return ExitCode.FAILED
    attempt.record(code)
    print(f"[retrain] {attempt.row['decision']} (exit {int(code)})", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
