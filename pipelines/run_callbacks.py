"""What the runner adds to every Trainer of a run: checkpoints, signal and divergence guards, early
stopping, the run's summary and report, the predictions file and the W&B logger.

:class:`pipelines.cli.PipelineCLI` calls :func:`run_trainer_settings` once the run folder is known;
callbacks a user configures (``--trainer.callbacks``) come first and are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from pipelines.callback_group import CallbackGroup, UnmeasuredProfiler
from pipelines.checkpointing import TieBreakingCheckpoint
from pipelines.domain_registry import DomainSpec
from pipelines.guards import NonFiniteLossGuard, PredictStopsOnSigterm, SignalCheckpoint
from pipelines.predictions import CsvPredictionWriter
from pipelines.report import RunReport
from pipelines.resume_data import DataFilesRecord, data_files, data_options
from pipelines.run_folder import BEST_CHECKPOINT, RunFolder
from pipelines.tracking import RunSummary, WatchModel, make_wandb_logger
from pipelines.wandb_replay import ReplayMetrics


@dataclass
class RunTrainerSettings:
    """Trainer arguments of a run (``callbacks``, and ``logger`` unless the user configured one) and
    the callback that writes ``last.ckpt`` on SIGTERM/SIGINT (``fit`` only), which the CLI asks after a stop."""

    overrides: dict[str, Any]
    signal_checkpoint: SignalCheckpoint


def run_trainer_settings(
    spec: DomainSpec, run: RunFolder, subcommand: str, options: Any, trainer_cfg: Any, predictions: Path | None,
    explanations: Callback | None = None,
) -> RunTrainerSettings:
    """The callbacks and logger of one command on ``run``.

    Args:
        spec: the domain (its monitored metric, mode and W&B tags).
        run: the run folder the command works in.
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        options: the parsed options of the sub-command (``checkpoint_every_n_steps``, ``early_stopping_patience``,
            ``wandb_group``, ``wandb_job_type``, ``wandb_watch``).
        trainer_cfg: the sub-command's ``trainer`` section as LightningCLI instantiated it.
        predictions: the predictions file of ``predict`` (``None`` otherwise).
        explanations: ``predict --explain``'s writer (runs before the predictions writer: it may add a column).
    """
    callbacks: list[Callback] = list(trainer_cfg.get("callbacks") or [])
    signal_checkpoint = SignalCheckpoint(run.checkpoint_dir)  # every command: which signal stopped it (exit 130/143); fit: last.ckpt too
    if subcommand != "fit":
        callbacks.append(signal_checkpoint)  # (a Ctrl+C in predict exited 1, the crash code, with no paragraph: trial finding)
    else:
        callbacks.append(CallbackGroup(signal_checkpoint, NonFiniteLossGuard(options.get("checkpoint_every_n_steps"))))
        callbacks.append(DataFilesRecord(data_files(data_options(options.get("data")))))  # a resumed fit checks them (pipelines/resume_data.py)
    if trainer_cfg.get("enable_checkpointing", True) is not False:
        callbacks.append(
            TieBreakingCheckpoint(  # a tie on the monitor is decided by val/loss (pipelines/checkpointing.py)
                dirpath=run.checkpoint_dir,
                filename=BEST_CHECKPOINT.removesuffix(".ckpt"),
                monitor=spec.monitor,
                mode=spec.mode,
                save_last=True,
                save_top_k=1,
                auto_insert_metric_name=False,
                enable_version_counter=False,
            )
        )
        if (every := options.get("checkpoint_every_n_steps")) is not None:
            # only last.ckpt (save_top_k=0): best.ckpt stays chosen on the monitored metric at validation
            # the same last.ckpt as the callback above (no last-v1.ckpt): whichever saved last holds the newest state, and
            # --ckpt_path last resumes from it
            callbacks.append(ModelCheckpoint(dirpath=run.checkpoint_dir, every_n_train_steps=every, save_top_k=0, save_last=True, enable_version_counter=False))
    patience = options.get("early_stopping_patience")
    if patience is not None:
        callbacks.append(EarlyStopping(monitor=spec.monitor, mode=spec.mode, patience=patience, verbose=True))
    # report.html after the summary it reads (pipelines/report.py)
    records: list[Callback] = [RunSummary(run.path, spec.monitor, spec.mode), RunReport(run.path, spec.name)]
    logger_configured = trainer_cfg.get("logger") not in (None, True)
    if subcommand == "fit" and run.ckpt_path and not logger_configured:
        records.append(ReplayMetrics(str(run.path)))  # a killed segment's epochs reach W&B once (from metrics.jsonl)
    if not logger_configured:
        records.append(LearningRateMonitor(logging_interval="epoch"))
    callbacks.append(CallbackGroup(*records))  # one dispatch per hook for all of them (pipelines/callback_group.py)
    if explanations is not None:
        callbacks.append(explanations)
    if predictions is not None:
        callbacks.append(PredictStopsOnSigterm())  # before the writer: a stopped batch is not written
        callbacks.append(CsvPredictionWriter(predictions))
    overrides: dict[str, Any] = {"default_root_dir": str(run.path), "callbacks": callbacks}
    if trainer_cfg.get("profiler") is None:  # Lightning's default measures nothing; this one without a context built per hook call
        overrides["profiler"] = UnmeasuredProfiler()
    if not logger_configured:
        overrides["logger"] = make_wandb_logger(run, spec.tags, options.get("wandb_group"), options.get("wandb_job_type") or "train")
        watch = options.get("wandb_watch", "none")
        if watch != "none":
            callbacks.append(WatchModel(watch))
    return RunTrainerSettings(overrides, signal_checkpoint)
