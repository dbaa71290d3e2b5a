"""Experiment tracking: the W&B logger, the local metrics file, config upload and figure logging.

W&B runs are offline unless ``WANDB_API_KEY`` or ``WANDB_MODE`` says otherwise (:func:`wandb_mode`,
passed to ``wandb.init``; the environment is left as it is); the W&B run id is
the run folder's id, so resuming a run folder resumes its W&B run (``resume="allow"``, Lightning
#4935). Only ``WandbLogger`` talks to W&B, and only on rank zero (Lightning #11380).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from pipelines.files import write_json_atomic
from pipelines.guards import non_finite_metrics
from pipelines.plots import release_pyplot_figure, save_figure_atomic
from pipelines.run_folder import RunFolder

log = logging.getLogger(__name__)


def wandb_mode(environ: Mapping[str, str] | None = None) -> str:
    """The W&B mode a run of this project uses: ``WANDB_MODE`` when the user set it, else ``online``
    when ``WANDB_API_KEY`` is set, else ``offline``. It is passed to ``wandb.init(mode=...)`` (through
    ``WandbLogger``) by every caller; the process environment is never changed.

    Example:
        >>> wandb_mode({}), wandb_mode({"WANDB_API_KEY": "k"}), wandb_mode({"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"})
        ('offline', 'online', 'disabled')
    """
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    return "online" if environ.get("WANDB_API_KEY") else "offline"


class FiniteWandbLogger(WandbLogger):
    """``WandbLogger`` that survives non-finite values.

    A NaN or inf monitored metric gives the checkpoint a score of inf (``ModelCheckpoint``), and W&B
    refuses it in the model artifact's metadata (``ValueError: Out of range float values are not JSON
    compliant``) when the checkpoints are uploaded at the end of ``fit``: the run crashed after
    training. Such an upload is skipped with a message instead (the checkpoints stay in the run
    folder). NaN and inf metrics are left out of the W&B history; ``metrics.jsonl`` and
    ``summary.json`` keep them as ``"nan"``/``"inf"``.
    """

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        finite = {k: v for k, v in metrics.items() if not (isinstance(v, (int, float)) and not math.isfinite(float(v)))}
        super().log_metrics(finite, step)

    def finalize(self, status: str) -> None:
        try:
            super().finalize(status)
        except ValueError as error:
            if "JSON" not in str(error):
                raise
            log.warning(f"W&B: checkpoints not uploaded as model artifacts, their score is not finite ({error}); they are in the run folder's checkpoints/")


def make_wandb_logger(run: RunFolder, tags: tuple[str, ...] = (), group: str | None = None, job_type: str = "train") -> WandbLogger:
    """One W&B project per domain; run id = run folder id; checkpoints logged as model artifacts;
    ``group`` and ``job_type`` come from the runner's ``--wandb_group`` / ``--wandb_job_type``."""
    run.path.mkdir(parents=True, exist_ok=True)
    return FiniteWandbLogger(
        project=os.environ.get("WANDB_PROJECT", f"domain-pipelines-{run.domain}"),
        name=run.run_id,
        id=run.run_id,
        resume="allow",
        save_dir=str(run.path),
        log_model=True,
        tags=list(tags),
        job_type=job_type,
        group=group or None,
        mode=wandb_mode(),  # to wandb.init: offline unless the user configured W&B
    )


def finish_wandb_run() -> None:
    """Close this process's W&B run, if one is open (Lightning leaves it open after ``fit``/``test``)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class UploadConfigToWandb(SaveConfigCallback):
    """Save the resolved config in the run folder and upload it with the W&B run (Lightning #19728).

    ``predict`` writes its config at its end, under its predictions file's number
    (:func:`pipelines.predictions.predict_config_name`, chosen by the CLI), never over an earlier one.

    The config goes to the W&B run's config (key ``cli``) and, as a file, to a ``config`` artifact
    (W&B's own ``config.yaml`` in the run's files would clash with the name).
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            super().setup(trainer, pl_module, stage)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A predict's config is written once its predictions file is complete (the CSV writer's ``on_predict_end``
        runs first: the CLI appends this callback after the run's): a failed predict leaves none behind."""
        super().setup(trainer, pl_module, "predict")

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import wandb

        for logger in wandb_loggers(trainer):  # rank zero only: no `trainer.log_dir` here, it is a collective
            config_path = Path(logger.save_dir or ".") / self.config_filename
            config = self.parser.dump(self.config, skip_none=False, format="json")
            logger.experiment.config.update({"cli": json.loads(config)}, allow_val_change=True)
            if config_path.is_file():
                artifact = wandb.Artifact(f"config-{logger.experiment.id}", type="config")
                artifact.add_file(str(config_path), name="config.yaml")
                logger.experiment.log_artifact(artifact)


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None


class RunSummary(pl.Callback):
    """Local record of a run: ``metrics.jsonl`` (appended, so resumes keep history) and ``summary.json``.

    Also declares a best-value summary of the monitored metric in W&B. Hooks run on every rank
    because reading ``trainer.callback_metrics`` may synchronise ``sync_dist`` metrics; only rank
    zero writes.
    """

    def __init__(self, run_dir: Path, monitor: str, mode: str) -> None:
        self.run_dir = Path(run_dir)
        self.monitor = monitor
        self.mode = mode

    def _append(self, trainer: pl.Trainer, stage: str) -> dict[str, float | str]:
        """Append the scalar metrics to ``metrics.jsonl``; NaN and inf are kept, as ``"nan"``/``"inf"``."""
        metrics: dict[str, float | str] = {k: v for k, raw in trainer.callback_metrics.items() if (v := _scalar(raw)) is not None}
        metrics.update(non_finite_metrics(dict(trainer.callback_metrics), prefix=""))
        if trainer.is_global_zero:
            row = {"stage": stage, "epoch": trainer.current_epoch, "step": trainer.global_step, **metrics}
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")
        return metrics

    def _update_summary(self, trainer: pl.Trainer, **fields: Any) -> None:
        if not trainer.is_global_zero:
            return
        path = self.run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        summary.update(fields)
        write_json_atomic(path, summary)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for logger in wandb_loggers(trainer):
                logger.experiment.define_metric(self.monitor, summary=self.mode)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._append(trainer, "fit")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        best_score = getattr(ckpt, "best_model_score", None)
        self._update_summary(
            trainer,
            monitor=self.monitor,
            mode=self.mode,
            best_checkpoint=getattr(ckpt, "best_model_path", None) or None,
            best_score=_scalar(best_score) if best_score is not None else None,
            epochs=trainer.current_epoch,
            global_step=trainer.global_step,
        )

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = self._append(trainer, "test")
        test = {k: v for k, v in metrics.items() if k.startswith("test/")}
        # bootstrap intervals a task computed on its test rows (pipelines/bootstrap.py), beside the metrics
        intervals = {k: v for k, v in (getattr(pl_module, "metric_intervals", None) or {}).items() if k in test}
        self._update_summary(trainer, test=test, test_intervals=intervals)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            metrics = self._append(trainer, "validate")
            self._update_summary(trainer, validate={k: v for k, v in metrics.items() if k.startswith("val/")})


class WatchModel(pl.Callback):
    """Histograms of the model's gradients (``gradients/<parameter>``, through ``wandb.watch``) and/or
    parameters (``parameters/<parameter>``) in W&B, every ``trainer.log_every_n_steps`` (rank zero).

    ``wandb.watch`` logs parameters from a forward hook of the watched module, which never fires for a
    LightningModule (Lightning calls its steps, not its ``forward``), so parameters are logged here.
    """

    def __init__(self, what: str = "gradients") -> None:
        if what not in ("gradients", "parameters", "all"):
            raise ValueError(f"what must be 'gradients', 'parameters' or 'all', got {what!r}")
        self.what = what

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.what in ("gradients", "all") and trainer.is_global_zero:
            for logger in wandb_loggers(trainer):
                logger.watch(pl_module, log="gradients", log_freq=trainer.log_every_n_steps, log_graph=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.what == "gradients" or not trainer.is_global_zero or trainer.global_step % trainer.log_every_n_steps:
            return
        import wandb

        histograms = {f"parameters/{name}": wandb.Histogram(p.detach().float().cpu()) for name, p in pl_module.named_parameters() if p.requires_grad}
        for logger in wandb_loggers(trainer):
            logger.experiment.log({**histograms, "trainer/global_step": trainer.global_step})


def log_figure(trainer: pl.Trainer, figure: Any, key: str) -> Path | None:
    """Save a matplotlib figure as ``<run>/plots/<key>.png`` and log it to W&B (rank zero only).

    ``key`` is a metric-style name such as ``"test/confusion_matrix"``.
    """
    path = None
    if trainer.is_global_zero:
        path = Path(trainer.default_root_dir) / "plots" / (key.replace("/", "_") + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_figure_atomic(figure, path)
        for logger in wandb_loggers(trainer):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
    release_pyplot_figure(figure)  # a figure drawn through pyplot (a task's own plotting) is let go
    return path
