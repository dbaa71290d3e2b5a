"""``PipelineCLI``: LightningCLI plus run folders, hardware choice, W&B and fit-then-test.

Everything a domain exposes is a typed ``__init__`` argument of its LightningModule or
LightningDataModule, so it is a CLI option and a YAML key; the domain's default YAML is the
parser's default config file, user ``--config`` files and options override it, and every option
can also come from an environment variable (``PIPELINES_FIT__TRAINER__MAX_EPOCHS=3``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import tempfile
import threading
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pipelines.checkpoint_options import check_model_options_kept, refused_before_the_checkpoint
from pipelines.checkpoints import check_domain, model_class, read_checkpoint, recorded_class_path
from pipelines.domain_registry import DomainSpec
from pipelines.errors import EXIT_SIGINT, EXIT_SIGTERM, InputError, RunStopped, did_you_mean
from pipelines.explain import explanation_writer
from pipelines.guards import NonFiniteLossError, SignalCheckpoint, non_finite_metrics
from pipelines.hardware import plan_hardware
from pipelines.parse_errors import config_file_problem, explain, foreign_config, single_dash_option, unknown_environment_options
from pipelines.predictions import predict_config_name, prediction_file
from pipelines.resume_data import check_resumed_data, data_options
from pipelines.resume_epochs import check_training_left
from pipelines.row_shards import check_grouped_shards
from pipelines.run_callbacks import run_trainer_settings
from pipelines.run_folder import (
    RUN_ID_ENV, RunFolder, RunFolderBusy, RunLock, default_checkpoint, record_in_config, record_provenance, resolve_run, saved_config_sections,
)  # fmt: skip
from pipelines.run_options import add_run_options, check_run_options
from pipelines.stops import sigterm_as_exit
from pipelines.task import compile_networks, eager_fallback
from pipelines.tracking import UploadConfigToWandb, finish_wandb_run
from pipelines.tuning import check_lr_findable, find_learning_rate

#: Errors that mean bad input or options when raised while the command is read and its data checked.
INPUT_ERRORS = (ValueError, OSError, KeyError, MisconfigurationException)
#: how jsonargparse words an exception raised by a link's ``compute_fn`` (the data module read by a link to the model)
LINK_FAILED = "Call to compute_fn of link"
UNION_FAILED = "Does not validate against any of the Union subtypes"  # a subclass-mode model's __init__ refused its options
log = logging.getLogger(__name__)
#: The runner's sub-commands (LightningCLI's); each works in one run folder. ``export`` is not one of
#: them: :mod:`pipelines.run` hands it to :mod:`pipelines.export` before this module is imported.
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def command_arguments(domain: str, args: list[str]) -> tuple[list[str], bool]:
    """The runner's arguments after the domain name as LightningCLI takes them, and whether to test the
    best checkpoint after fitting: without a sub-command, ``fit`` followed by ``test`` (a bare ``--help``
    or ``--print_config`` only shows fit's options or config)."""
    if args and args[0] in SUBCOMMANDS:
        return list(args), False
    if args and not args[0].startswith("-"):  # no sub-command takes a positional argument: a misspelt sub-command
        known = [*SUBCOMMANDS, "export"]
        usage = f"usage: python -m pipelines.run {domain} [{'|'.join(known)}] [--config FILE.yaml] [--help] [options]"
        raise InputError(f"unknown sub-command {args[0]!r}{did_you_mean(args[0], known)} (one of {', '.join(known)}).\n{usage}")
    informational = any(arg in ("-h", "--help") or arg.startswith("--print_config") for arg in args)
    return ["fit", *args], not informational


def run_domain(spec: DomainSpec, args: list[str]) -> PipelineCLI:
    """``python -m pipelines.run DOMAIN ARGS...`` once the dispatcher found the domain (:func:`command_arguments`)."""
    args, test_after_fit = command_arguments(spec.name, args)
    return PipelineCLI(spec, args, test_after_fit=test_after_fit)


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
        # the one look at the sub-command before the parse (pipelines/run.py puts it first), only to choose
        # which parser to build (:meth:`subcommands`); jsonargparse's parse still decides what ``args`` mean
        self.requested: str | None = args[0] if args and args[0] in SUBCOMMANDS else None
        self.run: RunFolder | None = None
        self._subcommand_parsers_seen: list[LightningArgumentParser] = []
        self._lock: RunLock | None = None
        self._checkpoint: dict[str, Any] | None = None
        self.signal_checkpoint: SignalCheckpoint | None = None
        self._scopes = contextlib.ExitStack()  # process-wide settings this command changes, restored when it ends
        defaults = {"default_config_files": [str(spec.config)], "exit_on_error": False}
        inherited_run_id = os.environ.get(RUN_ID_ENV)
        on_main_thread = threading.current_thread() is threading.main_thread()
        sigint_handler = signal.getsignal(signal.SIGINT) if on_main_thread else None
        try:
            with warnings.catch_warnings():  # the dispatcher hands LightningCLI the arguments after the domain name, by design
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                self._run_cli(spec, defaults, args)
        except SIGTERMException:
            raise self._stopped("SIGTERM", EXIT_SIGTERM) from None
        except SystemExit:
            if self.signal_checkpoint is not None and self.signal_checkpoint.stopped_by == "SIGINT":
                raise self._stopped("SIGINT", EXIT_SIGINT) from None  # Lightning turns Ctrl+C into exit(1)
            raise
        except NonFiniteLossError as error:
            raise RunStopped(f"{spec.name} fit: {error} ({self.run.path if self.run else ''})") from None
        finally:  # a later run in this process (tests, retraining) gets its own run folder and W&B run
            self._scopes.close()
            if self._lock is not None:
                self._lock.release()
            if sigint_handler is not None:  # Lightning ignores Ctrl+C for good after an interrupt
                signal.signal(signal.SIGINT, sigint_handler)
            if inherited_run_id is None:
                os.environ.pop(RUN_ID_ENV, None)
            finish_wandb_run()

    def _stopped(self, name: str, code: int) -> RunStopped:
        saved = self.signal_checkpoint.saved if self.signal_checkpoint else None
        assert self.run is not None
        if saved is not None:
            kept = f"checkpoint written: {saved}; continue with: python -m pipelines.run {self.spec.name} fit --ckpt_path last --run_id {self.run.run_id}"
        elif self.subcommand != "fit":  # nothing trains: what matters is that no output of this command is half written
            kept = f"its outputs were not completed (partial files removed); earlier outputs and checkpoints in {self.run.path} are kept"
        else:
            why = self.signal_checkpoint.save_error if self.signal_checkpoint and self.signal_checkpoint.save_error else "no training step had run"
            kept = f"no new checkpoint was written ({why}); earlier checkpoints in {self.run.checkpoint_dir} are kept"
        return RunStopped(f"{self.spec.name} {self.subcommand} stopped by {name}: {kept}", code)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        if kwargs.get("default_config_files"):  # a sub-command's parser: the run's saved config may join its defaults
            self._subcommand_parsers_seen.append(parser)
        return parser

    def _run_cli(self, spec: DomainSpec, defaults: dict[str, Any], args: list[str]) -> None:
        subcommand = self.requested or "fit"
        super().__init__(
            model_class=spec.load_model_class(),
            datamodule_class=spec.load_datamodule_class(),
            subclass_mode_model=spec.model_subclasses,
            save_config_callback=UploadConfigToWandb,
            # the fit config stays the run's config.yaml; test/predict/validate record theirs beside it
            save_config_kwargs={"overwrite": True, "config_filename": "config.yaml" if subcommand == "fit" else f"config-{subcommand}.yaml"},
            parser_kwargs={
                "prog": f"python -m pipelines.run {spec.name}",
                "exit_on_error": False,
                "default_env": True,
                "env_prefix": "PIPELINES",
                **{sub: dict(defaults) for sub in self.subcommands()},  # a dict each: Lightning writes each one's description into it
            },
            seed_everything_default=42,
            auto_configure_optimizers=False,  # each task owns configure_optimizers (BaseTask)
            args=args,
        )
        if getattr(self, "trainer", None) is not None:  # every rank meets here: a rank that failed after the last collective
            self.trainer.strategy.barrier("command end")  # fails rank zero too (gloo: peer closed; else Lightning's observer)

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]  # Lightning calls it as self.subcommands()
        """Only the sub-command being run gets a parser (building all four was ~3/4 of a command's parse
        time); without a sub-command in front (a bare ``--help``) all are built and listed."""
        every = LightningCLI.subcommands()
        return {self.requested: every[self.requested]} if self.requested in every else every

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_run_options(parser)
        model_args = "model.init_args" if self.spec.model_subclasses else "model"
        for source, target in self.spec.links:
            parser.link_arguments("data", f"{model_args}.{target}", compute_fn=partial(self._data_value, source), apply_on="instantiate")

    # ----- the checkpoint's fitted state reaches the data module before anything reads the data -----
    def _data_value(self, name: str, datamodule: Any) -> Any:
        """A value linked from the data module to the model, read after the data module took the
        checkpoint's fitted state (:meth:`_restore_data`)."""
        self._restore_data(datamodule)
        return getattr(datamodule, name)

    def _restore_data(self, datamodule: Any) -> None:
        """With ``--ckpt_path``, what the checkpoint saved of the data module (fitted statistics, classes,
        time step) is loaded right after it is built, before the links to the model or ``setup`` read
        anything: ``test`` and ``predict`` then read only the data they evaluate or score, never the
        training source (which may have moved). Lightning restores the same state again after ``setup``;
        every domain's ``load_state_dict`` may be called twice."""
        if self._checkpoint is None or datamodule is None:
            return
        state = self._checkpoint.get(type(datamodule).__qualname__)
        self._checkpoint = None  # loaded once, in parse_arguments
        if state:
            datamodule.load_state_dict(state)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse once; the run folder comes from that parse (CLI, ``--config`` files, ``PIPELINES_*``
        variables alike). A command on an existing run then takes the run's saved ``config.yaml`` as a
        layer of the same parse: above the domain's defaults, below ``--config`` files, variables and
        options (:func:`pipelines.run_folder.saved_config_sections`)."""
        self._parse(parser, args)
        sub = self.config.subcommand
        cfg = self.config[sub]
        check_run_options(sub, cfg)
        try:
            ckpt_path = cfg.get("ckpt_path")
            if sub != "fit" and not ckpt_path:  # evaluating or predicting needs trained weights: the run's best (else last), said
                ckpt_path, found = default_checkpoint(self.spec.name, cfg.runs_dir, cfg.run_id, sub)
                if rank_zero_only.rank == 0:
                    log.info(f"{sub}: no --ckpt_path given: using {found}")
            self.run = resolve_run(self.spec.name, cfg.runs_dir, cfg.run_id, ckpt_path)
        except ValueError as error:
            raise InputError(str(error)) from None
        if sub != "fit" and self.run.ckpt_path is None:  # (--ckpt_path last of a run that has none)
            raise InputError(f"{self.spec.name} {sub}: --ckpt_path {cfg.get('ckpt_path')}: no checkpoint under {self.run.path}; {sub} needs trained weights "
                             "(--ckpt_path best|last|FILE): without them it would score an untrained model")  # fmt: skip
        if self.run.ckpt_path:
            label = f"--ckpt_path {self.run.ckpt_path}"
            self._checkpoint = read_checkpoint(self.run.ckpt_path, label)  # its data module state is used before setup
            # another domain's checkpoint, named as such (its options would otherwise fail this domain's parser: exit 1, trial finding)
            check_domain(self.spec, self._checkpoint, label, fix=f"; use it with `python -m pipelines.run {{domain}} {sub} --ckpt_path {self.run.ckpt_path}`")
            # the class it names is checked before LightningCLI reads it from the checkpoint's hyper-parameters
            model_class(self.spec, recorded_class_path(self._checkpoint), label)
            # LightningCLI builds the model from the checkpoint's options: one given here that differs is refused, not ignored
            check_model_options_kept(args if isinstance(args, (list, tuple)) else [], self._checkpoint.get("hyper_parameters") or {}, label)
        reused = saved_config_sections(self.run, sub)
        if reused is not None:
            path, sections = reused
            with tempfile.TemporaryDirectory() as folder:
                layer = Path(folder) / "run-config.yaml"
                layer.write_text(yaml.safe_dump(sections, sort_keys=False))
                for sub_parser in self._subcommand_parsers_seen:
                    sub_parser.default_config_files = [str(self.spec.config), str(layer)]
                try:
                    self._parse(parser, args)
                finally:
                    for sub_parser in self._subcommand_parsers_seen:
                        sub_parser.default_config_files = [str(self.spec.config)]
            cfg = self.config[sub]
            if rank_zero_only.rank == 0:
                log.info(f"{sub}: using {', '.join(sections)} from {path}")
        if sub == "fit" and self._checkpoint is not None:  # resumed: on the data the checkpoint was trained on, or refused
            check_resumed_data(data_options(cfg.get("data")), self._checkpoint, f"--ckpt_path {self.run.ckpt_path}")
            check_training_left(self._checkpoint, cfg.get("trainer.max_epochs"), cfg.get("trainer.max_steps"), f"--ckpt_path {self.run.ckpt_path}")
        if cfg.get("ckpt_path") == "last" and self.run.ckpt_path is None and rank_zero_only.rank == 0:
            log.info(f"no last.ckpt under {self.run.path.parent} yet: starting a fresh run")
        cfg.ckpt_path = self.run.ckpt_path
        cfg.run_id = self.run.run_id
        if sub == "predict" and cfg.get("return_predictions") is None:
            cfg.return_predictions = False  # batches go to the predictions file as they come: memory stays flat
        # DDP workers are launched by Lightning as copies of this command (``sys.argv``, this process's
        # environment): they must land in the same run folder, and a variable is the only way to tell
        # them (Lightning offers no hook to add arguments to their command line). Removed again when
        # this command ends (``__init__``'s ``finally``).
        os.environ[RUN_ID_ENV] = self.run.run_id

    def _parse(self, parser: LightningArgumentParser, args: Any) -> None:
        options = sorted({o for p in self._subcommand_parsers_seen for a in p._actions for o in a.option_strings if o.startswith("--")})
        problem = config_file_problem(args) or single_dash_option(args, options) or unknown_environment_options(options, dict(os.environ))  # before jsonargparse reads them: a UTF-16
        # file would crash it, a key twice would pass, a misspelt variable would be ignored
        if problem:
            raise InputError(problem)
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:
            raise InputError(foreign_config(args, self.spec.name) or refused_before_the_checkpoint(args if isinstance(args, list) else [], str(error)) or explain(str(error), options, self.spec.name)) from None

    def instantiate_classes(self) -> None:
        """Data module, model, data check, then the trainer: bad input stops here, before any file is written.
        A SIGTERM while the data are read (a streaming cache being built) exits 143 through the readers' clean-up
        (a cache's temporary folder removed); Lightning's own handler takes over when the loop starts."""
        try:
            with sigterm_as_exit(f"{self.spec.name} {self.subcommand} (reading the data)"):
                super().instantiate_classes()
        except (InputError, RunStopped):
            raise
        except INPUT_ERRORS as error:
            cause: BaseException = error
            while isinstance(cause, ValueError) and (LINK_FAILED in str(cause) or UNION_FAILED in str(cause)) and cause.__cause__ is not None:
                cause = cause.__cause__  # jsonargparse wraps what a link's compute_fn (reading the data) or a model's __init__ raised: show that alone
            if isinstance(cause, (InputError, RunStopped)) or not isinstance(cause, INPUT_ERRORS):
                raise cause from None  # bad input as it was worded, or a crash (exit 1) as the crash it is
            raise InputError(str(cause)) from cause

    def _check_data(self) -> None:
        """Read and validate the data of this sub-command before the run folder or the W&B run exist
        (Lightning calls ``setup`` again later; every domain's ``setup`` returns at once when done)."""
        if self.subcommand == "fit" and self.config["fit"].get("lr_find"):
            check_lr_findable(self.model)
        if self.datamodule is None:
            return
        self._restore_data(self.datamodule)  # (done already when a link read the data module)
        if self.subcommand == "predict" and hasattr(self.model, "check_predict_data"):  # options the model could not honour (media's steps)
            self.model.check_predict_data(self.datamodule)
        self.datamodule.setup({"fit": "fit", "validate": "validate", "test": "test", "predict": "predict"}[self.subcommand])

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        assert self.run is not None
        self._check_data()
        trainer_cfg = self.config_init[self.subcommand]["trainer"]
        plan = plan_hardware(trainer_cfg, one_process="predict" if self.subcommand == "predict" else None)  # one predictions file
        if hasattr(self.datamodule, "check_processes"):  # data read per process (shards): refused before the run folder exists
            self.datamodule.check_processes(plan.processes)
        options = self.config[self.subcommand]
        if self.subcommand == "fit":  # groups of mini-batches from row shards read by several workers: refused here, not when training starts
            check_grouped_shards(self.model, self.datamodule, trainer_cfg, options.get("checkpoint_every_n_steps"))
        predictions = prediction_file(self.run.path, options.get("output")) if self.subcommand == "predict" else None
        if predictions is not None:  # its config is numbered like it (the callback is made in super().instantiate_trainer)
            self.save_config_kwargs["config_filename"] = predict_config_name(predictions)
        explanations = explanation_writer(self.model, predictions) if predictions is not None and options.get("explain") else None
        if rank_zero_only.rank == 0:  # DDP workers are copies of this command, inside the same run
            try:
                self._lock = RunLock(self.run.path, self.subcommand)
            except RunFolderBusy as error:
                raise InputError(str(error)) from None
        settings = run_trainer_settings(self.spec, self.run, self.subcommand, options, trainer_cfg, predictions, explanations)
        self.signal_checkpoint = settings.signal_checkpoint
        self._announce(plan.summary)
        return super().instantiate_trainer(**{**plan.settings, **settings.overrides, **kwargs})

    @rank_zero_only
    def _announce(self, hardware: str) -> None:
        assert self.run is not None
        seed = self.config[self.subcommand].get("seed_everything")
        record_provenance(self.run, self.subcommand, seed, hardware)
        resumed = f", from {self.run.ckpt_path}" if self.run.ckpt_path else ""
        log.info(f"{self.spec.name} {self.subcommand}: run folder {self.run.path}{resumed}")
        log.info(hardware)

    def after_instantiate_classes(self) -> None:
        if self.config[self.subcommand].get("compile"):
            self._scopes.enter_context(eager_fallback())  # closed when the command ends
            compiled = compile_networks(self.model)
            log.info(f"torch.compile: {', '.join(compiled) or 'no network found'}")

    def before_fit(self) -> None:
        """``--scale_batch_size`` and ``--lr_find``: Lightning's Tuner, before the first fit of a run."""
        config = self.config["fit"]
        mode = config.get("scale_batch_size", "none")
        assert self.run is not None
        if self.run.ckpt_path and (mode != "none" or config.get("lr_find")):
            if self.trainer.is_global_zero:  # the checkpoint's optimizer state and the run's config hold the values found
                log.info("resuming from a checkpoint: --scale_batch_size and --lr_find are skipped")
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
                log.info(f"lr_find: {reason}; keeping lr {self.model.hparams.lr} (curve: {plot})")
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
        path = record_in_config(self.run, values)
        log.info(f"{what} recorded in {path}")

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        if self.trainer.global_step == 0:  # e.g. fewer training rows than one batch with drop_last: nothing was learned
            raise RunStopped(f"{self.spec.name} fit ran no training step (no training batches?), so there is no trained model to test or keep "
                             "as a result; check the training split's size against --data.batch_size")
        ckpt = self.trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        if ckpt is not None and not best and self.trainer.is_global_zero:  # said, not silent: there is no best model to use
            log.warning(f"{self.spec.name} fit: {self.spec.monitor} was never computed (no validation ran: "
                        f"check_val_every_n_epoch {self.trainer.check_val_every_n_epoch}, {self.trainer.current_epoch} epoch(s) trained, "
                        f"limit_val_batches {self.trainer.limit_val_batches}), so there is no best.ckpt"
                        + ("; the test scores the last weights" if self.test_after_fit else "; last.ckpt holds the trained weights"))  # fmt: skip
        if not self.test_after_fit:
            return
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        self.after_test()

    def after_test(self) -> None:
        """A test metric that is NaN or inf is recorded as such (``summary.json``) and fails the command."""
        bad = non_finite_metrics(dict(self.trainer.callback_metrics))
        if bad:
            assert self.run is not None
            listed = ", ".join(f"{key} = {value}" for key, value in bad.items())
            raise RunStopped(
                f"{self.spec.name} test: {listed}: the model's outputs or the test data are not finite, so this evaluation "
                f"means nothing (recorded in {self.run.path / 'summary.json'})"
            )
