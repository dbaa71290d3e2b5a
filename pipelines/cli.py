"""``PipelineCLI``: LightningCLI plus run folders, hardware choice, W&B and fit-then-test.

Everything a domain exposes is a typed ``__init__`` argument of its LightningModule or
LightningDataModule, so it is a CLI option and a YAML key; the domain's default YAML is the
parser's default config file, user ``--config`` files and options override it, and every option
can also come from an environment variable (``PIPELINES_FIT__TRAINER__MAX_EPOCHS=3``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any, Literal

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from pipelines.hardware import plan_hardware
from pipelines.predictions import CsvPredictionWriter
from pipelines.registry import DomainSpec
from pipelines.runs import BEST_CHECKPOINT, RUN_ID_ENV, RunFolder, fitted_config, record_provenance, resolve_run, write_text_atomic
from pipelines.task import compile_networks
from pipelines.tracking import RunSummary, UploadConfigToWandb, WatchModel, configure_wandb_mode, finish_wandb_run, make_wandb_logger
from pipelines.tuning import find_learning_rate

from pipelines.run import SUBCOMMANDS


class PipelineCLI(LightningCLI):
    """LightningCLI for one domain.

    Args:
        spec: the domain to run.
        args: command-line arguments after the domain name (``fit`` is assumed when missing).
        test_after_fit: after ``fit``, test the best checkpoint (what ``pipelines.run DOMAIN`` does).
    """

    def __init__(self, spec: DomainSpec, args: list[str], test_after_fit: bool = False) -> None:
        self.spec = spec
        self.test_after_fit = test_after_fit
        self.run: RunFolder | None = None
        configure_wandb_mode()
        # the dispatcher hands LightningCLI the arguments after the domain name, by design
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        defaults = {"default_config_files": [str(spec.config)]}
        inherited_run_id = os.environ.get(RUN_ID_ENV)
        try:
            self._run_cli(spec, defaults, args)
        finally:  # a later run in this process (tests, retraining) gets its own run folder and W&B run
            if inherited_run_id is None:
                os.environ.pop(RUN_ID_ENV, None)
            finish_wandb_run()

    def _run_cli(self, spec: DomainSpec, defaults: dict[str, Any], args: list[str]) -> None:
        subcommand = args[0] if args else "fit"
        reused = fitted_config(spec.name, args)
        if reused is not None:  # below the user's own --config files and options, which still win
            path, sections = reused
            args = [subcommand, "--config", json.dumps(sections), *args[1:]]
            if rank_zero_only.rank == 0:
                print(f"[pipelines] {subcommand}: using {', '.join(sections)} from {path}", file=sys.stderr)
        super().__init__(
            model_class=spec.load_model_class(),
            datamodule_class=spec.load_datamodule_class(),
            subclass_mode_model=spec.model_subclasses,
            save_config_callback=UploadConfigToWandb,
            # the fit config stays the run's config.yaml; test/predict/validate record theirs beside it
            save_config_kwargs={"overwrite": True, "config_filename": "config.yaml" if subcommand == "fit" else f"config-{subcommand}.yaml"},
            parser_kwargs={
                "prog": f"python -m pipelines.run {spec.name}",
                "default_env": True,
                "env_prefix": "PIPELINES",
                **{sub: defaults for sub in SUBCOMMANDS},
            },
            seed_everything_default=42,
            auto_configure_optimizers=False,  # each task owns configure_optimizers (BaseTask)
            args=args,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
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
        parser.add_argument(
            "--checkpoint_every_n_steps", type=int | None, default=None,
            help="Also write checkpoints/last.ckpt every N training steps (long epochs: a killed run resumes from there).",
        )  # fmt: skip
        parser.add_argument(
            "--early_stopping_patience", type=int | None, default=None,
            help="Stop fitting when the domain's monitored metric has not improved for this many validation runs.",
        )  # fmt: skip
        model_args = "model.init_args" if self.spec.model_subclasses else "model"
        for source, target in self.spec.links:
            parser.link_arguments(f"data.{source}", f"{model_args}.{target}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.subcommand
        cfg = self.config[sub]
        for option, unit in (("early_stopping_patience", "validation runs"), ("checkpoint_every_n_steps", "training steps")):
            if cfg.get(option) is not None and cfg.get(option) < 1:
                parser.error(f"--{option} must be at least 1 ({unit}), got {cfg.get(option)}")
        try:
            self.run = resolve_run(self.spec.name, cfg.runs_dir, cfg.run_id, cfg.get("ckpt_path"))
        except ValueError as error:
            parser.error(str(error))
        if cfg.get("ckpt_path") == "last" and self.run.ckpt_path is None and rank_zero_only.rank == 0:
            print(f"[pipelines] no last.ckpt under {self.run.path.parent} yet: starting a fresh run", file=sys.stderr)
        cfg.ckpt_path = self.run.ckpt_path
        cfg.run_id = self.run.run_id
        # DDP workers are launched as copies of this command: they must land in the same run folder.
        os.environ[RUN_ID_ENV] = self.run.run_id

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        assert self.run is not None
        trainer_cfg = self.config_init[self.subcommand]["trainer"]
        plan = plan_hardware(trainer_cfg)
        run_dir = self.run.path
        callbacks = list(trainer_cfg.get("callbacks") or [])
        options = self.config[self.subcommand]
        if trainer_cfg.get("enable_checkpointing", True) is not False:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=self.run.checkpoint_dir,
                    filename=BEST_CHECKPOINT.removesuffix(".ckpt"),
                    monitor=self.spec.monitor,
                    mode=self.spec.mode,
                    save_last=True,
                    save_top_k=1,
                    auto_insert_metric_name=False,
                    enable_version_counter=False,
                )
            )
            if (every := options.get("checkpoint_every_n_steps")) is not None:
                # only last.ckpt (save_top_k=0): best.ckpt stays chosen on the monitored metric at validation
                callbacks.append(ModelCheckpoint(dirpath=self.run.checkpoint_dir, every_n_train_steps=every, save_top_k=0, save_last=True))
        patience = options.get("early_stopping_patience")
        if patience is not None:
            callbacks.append(EarlyStopping(monitor=self.spec.monitor, mode=self.spec.mode, patience=patience, verbose=True))
        callbacks += [RunSummary(run_dir, self.spec.monitor, self.spec.mode), CsvPredictionWriter(run_dir)]
        overrides: dict[str, Any] = {**plan.settings, "default_root_dir": str(run_dir), "callbacks": callbacks}
        if trainer_cfg.get("logger") in (None, True):
            overrides["logger"] = make_wandb_logger(self.run, tags=self.spec.tags)
            callbacks.append(LearningRateMonitor(logging_interval="epoch"))
            watch = options.get("wandb_watch", "none")
            if watch != "none":
                callbacks.append(WatchModel(watch))
        self._announce(plan.summary)
        return super().instantiate_trainer(**{**overrides, **kwargs})

    @rank_zero_only
    def _announce(self, hardware: str) -> None:
        assert self.run is not None
        seed = self.config[self.subcommand].get("seed_everything")
        record_provenance(self.run, self.subcommand, seed, hardware)
        resumed = f", from {self.run.ckpt_path}" if self.run.ckpt_path else ""
        print(f"[pipelines] {self.spec.name} {self.subcommand}: run folder {self.run.path}{resumed}", file=sys.stderr)
        print(f"[pipelines] {hardware}", file=sys.stderr)

    def after_instantiate_classes(self) -> None:
        if self.config[self.subcommand].get("compile"):
            compiled = compile_networks(self.model)
            print(f"[pipelines] torch.compile: {', '.join(compiled) or 'no network found'}", file=sys.stderr)

    def before_fit(self) -> None:
        """``--scale_batch_size`` and ``--lr_find``: Lightning's Tuner, before the first fit of a run."""
        config = self.config["fit"]
        mode = config.get("scale_batch_size", "none")
        assert self.run is not None
        if self.run.ckpt_path and (mode != "none" or config.get("lr_find")):
            if self.trainer.is_global_zero:  # the checkpoint's optimizer state and the run's config hold the values found
                print("[pipelines] resuming from a checkpoint: --scale_batch_size and --lr_find are skipped", file=sys.stderr)
            return
        if mode != "none":
            from lightning.pytorch.tuner import Tuner

            found = Tuner(self.trainer).scale_batch_size(self.model, datamodule=self.datamodule, mode=mode)
            self._record_tuned({("data", "batch_size"): int(found), ("scale_batch_size",): "none"}, f"batch size {int(found)} (Tuner)")
        if config.get("lr_find"):
            self._find_learning_rate()

    def _find_learning_rate(self) -> None:
        """``--lr_find``: the learning rate found becomes the model's ``lr`` for this fit and is written
        into the run's config.yaml (:func:`pipelines.tuning.find_learning_rate`)."""
        suggestion, reason, plot = find_learning_rate(self.trainer, self.model, self.datamodule)
        if suggestion is None:
            if self.trainer.is_global_zero:
                print(f"[pipelines] lr_find: {reason}; keeping lr {self.model.hparams.lr} (curve: {plot})", file=sys.stderr)
            self._record_tuned({("lr_find",): False}, "lr_find: false")
            return
        self.model.hparams.lr = suggestion
        model_key = ("model", "init_args", "lr") if self.spec.model_subclasses else ("model", "lr")
        self._record_tuned({model_key: suggestion, ("lr_find",): False}, f"learning rate {suggestion:.3g} (Tuner)")

    @rank_zero_only
    def _record_tuned(self, values: dict[tuple[str, ...], Any], what: str) -> None:
        """Write what the Tuner found into the run's config.yaml, so that a resumed run, ``test`` and
        ``predict`` use it instead of the configured value (and a resume does not search again)."""
        assert self.run is not None
        path = self.run.path / "config.yaml"
        config = yaml.safe_load(path.read_text())
        for keys, value in values.items():
            section = config
            for key in keys[:-1]:
                section = section[key]
            section[keys[-1]] = value
        write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
        print(f"[pipelines] {what} recorded in {path}", file=sys.stderr)

    def after_fit(self) -> None:
        if not self.test_after_fit or self.trainer.interrupted:
            return
        ckpt = self.trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
