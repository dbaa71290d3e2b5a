"""The runner's own options, beside the model's, the data's and the trainer's: their definitions and checks.

:class:`pipelines.cli.PipelineCLI` adds them to every sub-command's parser (:func:`add_run_options`) and
checks them once parsed (:func:`check_run_options`), before the run folder exists.
"""

from __future__ import annotations

from typing import Any, Literal

from pipelines.errors import InputError


def add_run_options(parser: Any) -> None:
    """``--run_id``, ``--runs_dir``, ``--compile``, the Tuner's, W&B's, checkpointing's, early stopping's and predict's options."""
    parser.add_argument("--run_id", type=str | None, default=None, help="Run folder id (resume/continue a run).")
    parser.add_argument("--runs_dir", type=str, default="runs", help="Root folder of run folders.")
    parser.add_argument(
        "--compile", type=bool, default=False,
        help="torch.compile the model's networks; graphs that fail to compile fall back to eager execution.",
    )  # fmt: skip
    parser.add_argument(
        "--scale_batch_size", type=Literal["none", "power", "binsearch"], default="none",
        help="Before fit, find the largest batch size that fits (Lightning's Tuner; single device).",
    )  # fmt: skip
    parser.add_argument(
        "--lr_find", type=bool, default=False,
        help="Before fit, run Lightning's learning-rate range test and train with a tenth of the learning rate "
        "at the lowest loss (models with one learning rate `lr`; ~110 training steps or more; under DDP rank zero's curve decides). "
        "The curve goes to plots/tuner_lr_find.png.",
    )  # fmt: skip
    parser.add_argument(
        "--wandb_watch", type=Literal["none", "gradients", "parameters", "all"], default="none",
        help="Log histograms of the model's gradients and/or parameters to W&B every log_every_n_steps.",
    )  # fmt: skip
    parser.add_argument("--wandb_group", type=str | None, default=None, help="W&B run group (retraining and sweeps group their runs by it).")
    parser.add_argument("--wandb_job_type", type=str, default="train", help="W&B job type of the run (retraining: retrain, retrain-eval; sweeps: sweep-trial).")
    parser.add_argument(
        "--checkpoint_every_n_steps", type=int | None, default=None,
        help="Also write checkpoints/last.ckpt every N training steps (long epochs: a killed run resumes from there).",
    )  # fmt: skip
    parser.add_argument(
        "--early_stopping_patience", type=int | None, default=None,
        help="Stop fitting when the domain's monitored metric has not improved for this many validation runs.",
    )  # fmt: skip
    parser.add_argument(
        "--output", type=str | None, default=None,
        help="predict: name of the predictions file in the run folder (refused if it exists). "
        "Default: predictions.csv, or predictions-2.csv, ... when earlier ones exist (never overwritten).",
    )  # fmt: skip
    parser.add_argument("--explain", type=bool, default=False, help="predict: also write each prediction's explanation beside the "
                        "predictions file (healthcare: Grad-CAM heat maps, pipelines/explain.py); refused for models without one.")  # fmt: skip


def check_run_options(sub: str, cfg: Any) -> None:
    """:class:`InputError` for a count below 1, or a ``predict`` option given to another sub-command ``sub``."""
    for option, unit in (("early_stopping_patience", "validation runs"), ("checkpoint_every_n_steps", "training steps")):
        if cfg.get(option) is not None and cfg.get(option) < 1:
            raise InputError(f"--{option} must be at least 1 ({unit}), got {cfg.get(option)}")
    if cfg.get("output") is not None and sub != "predict":
        raise InputError(f"--output names the file of `predict`; {sub} writes no predictions")
    if cfg.get("explain") and sub != "predict":
        raise InputError(f"--explain writes explanations beside the predictions of `predict`; {sub} writes no predictions")
    trainer = cfg.get("trainer") or {}
    if sub == "fit":  # a fit that trains nothing would still be tested and reported as a result
        for option in ("limit_train_batches", "max_epochs", "max_steps"):
            value = trainer.get(option)
            if value is not None and not isinstance(value, bool) and value == 0:
                raise InputError(f"--trainer.{option} {value}: this fit would run no training step, and the untrained model would be "
                                 "tested and reported as the run's result; give at least one batch, epoch or step")
