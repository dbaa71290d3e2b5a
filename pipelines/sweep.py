"""``python -m pipelines.sweep DOMAIN --space space.yaml --trials N [--workers W] [runner options]``.

A hyper-parameter sweep on Optuna: TPE by default (``--sampler random|grid``), a search space in
YAML over any runner option (:mod:`pipelines.sweep_space`), median or Hyperband pruning
(``--pruner``) through a Lightning callback in each trial (:mod:`pipelines.sweep_trial`).

- Each trial is a real ``python -m pipelines.run DOMAIN`` child process with the sampled options
  added to the sweep's fixed runner options (``--data.*``, ``--trainer.*``, ``--config``): a normal
  run folder ``<runs_dir>/<domain>/<name>-t<NNNN>`` (fit, then test), in the W&B group ``<name>``.
  Its objective is the domain's own ``monitor``/``mode`` (``best_score`` in the run's
  ``summary.json``); nothing here is domain-specific.
- A trial that exits non-zero (2: a value the runner refuses; 1: a crash or a diverged run) is
  recorded as FAIL with its exit code and error line, never as the best; the sweep goes on.
- The study lives in ``<sweeps_dir>/<domain>/<name>/study.db`` (SQLite) or in any RDB URL given
  with ``--storage`` (PostgreSQL, MySQL): several sweep commands, on one machine or many (a SLURM
  array, a Kubernetes indexed Job: ``deploy/``), share one study and stop when it has N trials.
- Killed and started again with the same command, a sweep resumes its study: a trial whose worker
  died stops sending heartbeats, is marked FAIL and retried with the same parameters. A command
  starts no more trials than the study lacks and ends with no retry waiting (:mod:`pipelines.sweep_counts`).
- The sweep folder holds ``best.yaml`` (the best trial's config, for ``pipelines.run`` and
  ``pipelines.retrain`` ``--config``), ``trials.csv``, ``plots/`` and ``logs/trial-NNNN.log``; the
  plots and the trials table also go to a W&B run of job type ``sweep`` in the sweep's group.

Exit status: 0 the study has N finished trials and at least one completed; 1 none completed, or a
crash; 2 a bad space file or option, refused before any trial runs; 143/130 stopped by
SIGTERM/SIGINT (running trials are stopped and retried when the same command runs again).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from pipelines.domain_registry import get_domain
from pipelines.errors import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_SIGINT, EXIT_SIGTERM, InputError, crash_message, debug_requested, paragraph
from pipelines.option_spelling import OptionParser
from pipelines.run_folder import RUN_ID_ENV
from pipelines.sweep_counts import check_grid_size, count_trials, existing_trials, sampler_seed, trials_to_start
from pipelines.sweep_report import error_line, log_to_wandb, plot_study, print_progress, write_best_config, write_trials_csv
from pipelines.sweep_space import Parameter, check_option_names, load_space, option_value, resolve_runner_config

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")  # pipelines.sweep_trial.PRUNERS, without importing Lightning to print --help
PRUNER_WARMUP = 5  # pipelines.sweep_trial.PRUNER_WARMUP, likewise


def grace_period(heartbeat_interval: int) -> int:
    """Seconds without a heartbeat before a running trial is failed and retried: twice the interval
    (Optuna's default), and at least the interval plus 10 s, so that a heartbeat delayed on a busy
    machine (a SQLite lock held by another worker) does not fail a live trial.

    Example:
        >>> grace_period(1), grace_period(60)
        (11, 120)
    """
    return max(2 * heartbeat_interval, heartbeat_interval + 10)


class UsageError(InputError):
    pass


class _Parser(OptionParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(f"{message}; `python -m pipelines.sweep --help` lists the options")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m pipelines.sweep", allow_abbrev=False,
        usage="python -m pipelines.sweep DOMAIN --space SPACE.yaml --trials N [--workers W] [options] [runner options: --config, --data.X, --model.X, --trainer.X]",
        description="Hyper-parameter sweep of a domain on Optuna; every other option goes to each trial's runner.",
    )  # fmt: skip
    parser.add_argument("domain")
    parser.add_argument("--space", required=True, help="YAML file: runner option -> {low, high[, log][, step]} or {choices: [...]}.")
    parser.add_argument("--trials", type=int, required=True, help="Finished trials the study should have (complete, pruned or failed; shared by all workers).")
    parser.add_argument("--workers", type=int, default=1, help="Trials run at once by this command (each a child process).")
    parser.add_argument("--name", default=None, help="Study name (default: the space file's name); the same name resumes the study.")
    parser.add_argument("--storage", default=None, help="Optuna RDB URL shared by all workers (default: sqlite:///<sweep folder>/study.db).")
    parser.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="tpe (default), random, or grid (every combination of `choices`).")
    parser.add_argument("--pruner", choices=PRUNERS, default="median", help="Stop unpromising trials after a validation run.")
    parser.add_argument("--pruner_warmup", type=int, default=PRUNER_WARMUP,
                        help=f"Validation runs every trial gets before it can be pruned (default {PRUNER_WARMUP}): early scores are mostly noise.")
    parser.add_argument("--seed", type=int, default=None, help="Sampler seed, plus the trials the study already has (leave unset when several workers share a study).")
    parser.add_argument("--sweeps_dir", default="sweeps", help="Sweep folders go to SWEEPS_DIR/DOMAIN/NAME/.")
    parser.add_argument("--runs_dir", default="runs", help="Trials' run folders go to RUNS_DIR/DOMAIN/.")
    parser.add_argument("--heartbeat_interval", type=int, default=60, help="Seconds between a running trial's heartbeats; a trial silent for twice that (at least that plus 10 s) is failed and retried.")
    parser.add_argument("--no_wandb", action="store_true", help="Do not write the sweep's own W&B run (trials still log theirs).")
    return parser


class TrialFailed(Exception):
    """A trial's runner exited non-zero or left no finite score: recorded as FAIL, the sweep goes on."""


class TrialStopped(TrialFailed):
    """The sweep was stopped by a signal while this trial ran: it is retried when the sweep resumes."""


class TrialAlreadyRecorded(TrialFailed):
    """The trial was recorded as failed while its runner still ran (its heartbeat was silent for longer
    than the grace period, e.g. SQLite busy on a loaded machine) and a retry with the same parameters
    was queued: its result is not recorded again."""

    def __init__(self, number: int, code: int) -> None:
        super().__init__(f"trial {number} ended (exit {code}) after it had been recorded as failed for a silent heartbeat; its retry runs the same parameters")


class Sweep:
    def __init__(self, options: argparse.Namespace, runner_args: list[str]) -> None:
        import optuna

        self.options, self.runner_args = options, runner_args
        self.spec = get_domain(options.domain)
        self.space: list[Parameter] = load_space(options.space)
        for name, value in (("--trials", options.trials), ("--workers", options.workers), ("--heartbeat_interval", options.heartbeat_interval)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if options.pruner_warmup < 0:
            raise UsageError(f"--pruner_warmup must be 0 or more validation runs, got {options.pruner_warmup}")
        for i, arg in enumerate(runner_args):
            if not arg.startswith("--") and (i == 0 or not runner_args[i - 1].startswith("--") or "=" in runner_args[i - 1]):
                raise UsageError(f"unexpected argument {arg!r}: a sweep runs `fit` (then `test`); give runner options only")
            if arg.split("=")[0] in ("--run_id", "--ckpt_path", "--trainer.logger"):
                raise UsageError(f"{arg.split('=')[0]} is set by the sweep for each trial")
        if options.sampler == "grid" and any(p.choices is None for p in self.space):
            raise UsageError(f"--sampler grid needs `choices` for every option of {options.space}")
        if options.sampler == "grid":
            check_grid_size(self.space, options.trials, options.space)
        self.name = options.name or Path(options.space).stem
        self.folder = Path(options.sweeps_dir) / self.spec.name / self.name
        self.runs_dir = Path(options.runs_dir).resolve()
        config = resolve_runner_config(self.spec.name, [*runner_args, f"--runs_dir={self.runs_dir}"])
        check_option_names(self.space, config, options.space, self.spec.name)
        from pipelines.sweep_trial import check_storage_url

        if options.storage:
            check_storage_url(options.storage)  # before the sweep folder is made
        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._open_study(optuna, options)
        except UsageError:
            if created:  # a refused resume leaves no empty sweep folder behind
                shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.stopped_by: str | None = None
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def _open_study(self, optuna: Any, options: argparse.Namespace) -> None:
        """Create or load the study (its storage: ``--storage`` or ``study.db`` in the sweep folder) and check that a resumed one is the same."""
        from pipelines.sweep_trial import make_pruner, open_storage

        self.storage_url = options.storage or f"sqlite:///{(self.folder / 'study.db').resolve()}"

        direction = "maximize" if self.spec.mode == "max" else "minimize"
        for attempt in range(6):  # workers starting together race to create the same new study's tables
            try:
                self.storage = open_storage(self.storage_url, heartbeat_interval=options.heartbeat_interval, grace_period=grace_period(options.heartbeat_interval))
                self.study = optuna.create_study(
                    study_name=self.name, storage=self.storage, load_if_exists=True, direction=direction,
                    sampler=self._sampler(optuna, existing_trials(self.storage, self.name)), pruner=make_pruner(options.pruner, options.pruner_warmup),
                )  # fmt: skip
                break
            except Exception as error:  # sqlalchemy's IntegrityError/OperationalError (e.g. UNIQUE alembic_version)
                if attempt == 5 or type(error).__module__.split(".")[0] not in ("sqlalchemy", "optuna"):
                    raise
                time.sleep(0.5 + random.random())
        self._check_same_study(direction)

    def _sampler(self, optuna: Any, existing: int) -> Any:
        """The sampler, seeded with ``--seed`` plus the study's ``existing`` trials (:func:`sampler_seed`)."""
        seed = sampler_seed(self.options.seed, existing)
        if seed != self.options.seed:
            print_progress(f"study {self.name!r} has {existing} trial(s): sampler seed {self.options.seed} + {existing} = {seed}")
        if self.options.sampler == "grid":
            from pipelines.sweep_space import choice_label

            return optuna.samplers.GridSampler({p.option: [choice_label(c) for c in p.choices] for p in self.space}, seed=seed)
        if self.options.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def _check_same_study(self, direction: str) -> None:
        """A resumed study must search the same space for the same domain, in the same direction."""
        recorded = {"domain": self.spec.name, "monitor": self.spec.monitor, "space": {p.option: p.describe() for p in self.space},
                    "fixed_options": self.runner_args}  # fmt: skip
        attrs = self.study.user_attrs
        for key, value in recorded.items():
            if key in attrs and json.dumps(attrs[key], sort_keys=True) != json.dumps(value, sort_keys=True):
                raise UsageError(
                    f"study {self.name!r} in {self.storage_url} was started with {key} {attrs[key]!r}, this command has {value!r}; "
                    f"give --name another study name, or the same {key} to resume it"
                )
            if key not in attrs:
                self.study.set_user_attr(key, value)
        if self.study.direction.name.lower() != direction:
            raise UsageError(f"study {self.name!r} was created to {self.study.direction.name.lower()}, {self.spec.monitor} needs {direction}")

    # ----- counting ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return count_trials(self.study.get_trials(deepcopy=False))

    # ----- one trial ---------------------------------------------------------------------------
    def objective(self, trial: Any) -> float:
        import optuna

        params = {p.option: p.suggest(trial) for p in self.space}
        run_id = f"{self.name}-t{trial.number:04d}"
        run_dir = self.runs_dir / self.spec.name / run_id
        log = self.folder / "logs" / f"trial-{trial.number:04d}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        for inherited in ("outcome", "error", "exit_code", "pruned_at"):  # a retry starts with a copy of the stopped trial's attributes
            if trial.user_attrs.get(inherited) is not None:
                trial.set_user_attr(inherited, None)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{platform.node()}:{os.getpid()}")
        if run_dir.exists():
            return self._failed(trial, None, f"run folder {run_dir} already exists (another study with this name used this runs_dir)")
        command = [sys.executable, "-m", "pipelines.child_run", f"--parent={os.getpid()}", self.spec.name, *self.runner_args,
                   *[f"--{option}={option_value(value)}" for option, value in params.items()],
                   f"--runs_dir={self.runs_dir}", f"--run_id={run_id}", f"--wandb_group={self.name}", "--wandb_job_type=sweep-trial"]  # fmt: skip
        if self.options.pruner != "none":
            command += ["--trainer.callbacks+=pipelines.sweep_trial.OptunaPruning", f"--trainer.callbacks.storage={self.storage_url}",
                        f"--trainer.callbacks.study={self.name}", f"--trainer.callbacks.trial_id={trial._trial_id}",
                        f"--trainer.callbacks.monitor={self.spec.monitor}", f"--trainer.callbacks.pruner={self.options.pruner}",
                        f"--trainer.callbacks.pruner_warmup={self.options.pruner_warmup}"]  # fmt: skip
        env = {**os.environ}
        env.pop(RUN_ID_ENV, None)  # each trial is its own run, never that of a run this sweep was started from
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        print_progress(f"trial {trial.number} started: {shown} -> {run_dir}")
        with open(log, "w") as output:
            child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            with self.lock:
                self.children.add(child)
            try:
                code = child.wait()
            finally:
                with self.lock:
                    self.children.discard(child)
        if self.storage.get_trial(trial._trial_id).state.is_finished():  # failed for a silent heartbeat meanwhile
            already = TrialAlreadyRecorded(trial.number, code)
            print_progress(str(already))
            raise already
        trial.set_user_attr("exit_code", code)
        if self.stopped_by is not None and code != 0:
            trial.set_user_attr("outcome", "stopped")
            raise TrialStopped(f"stopped by {self.stopped_by} (exit {code}); retried when the sweep resumes")
        if code != 0:
            return self._failed(trial, code, error_line(log) or f"see {log}")
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        score = summary.get("best_score")
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            return self._failed(trial, code, f"no finite {self.spec.monitor} best_score in {summary_path} (got {score!r})")
        test = summary.get("test") or {}
        trial.set_user_attr("test", {k: v for k, v in test.items() if isinstance(v, (int, float))})
        pruned_at = self.storage.get_trial(trial._trial_id).user_attrs.get("pruned_at")
        if pruned_at is not None:
            trial.set_user_attr("outcome", "pruned")
            raise optuna.TrialPruned(f"pruned after validation run {pruned_at}")
        trial.set_user_attr("outcome", "complete")
        return float(score)

    def _failed(self, trial: Any, code: int | None, why: str) -> float:
        trial.set_user_attr("outcome", "failed")
        trial.set_user_attr("error", why)
        raise TrialFailed(f"exit {code}: {why}" if code is not None else why)

    def after_trial(self, study: Any, trial: Any) -> None:
        """After each trial: retry one stopped by a signal, fail stale ones, report, stop when done."""
        import optuna

        if trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs.get("outcome") == "stopped":
            optuna.storages.RetryHeartbeatStaleTrialCallback()(study, trial)
        optuna.storages.fail_stale_trials(study)
        counts = self.counts()
        value = "" if trial.value is None else f" {self.spec.monitor}={trial.value:.6g}"
        error = f" ({trial.user_attrs.get('error') or trial.user_attrs.get('outcome', 'lost')})" if trial.state == optuna.trial.TrialState.FAIL else ""
        print_progress(f"trial {trial.number} {trial.state.name}{value}{error}; {counts['finished']}/{self.options.trials} finished")
        with self.lock:
            write_best_config(study, self.folder, self.spec.monitor, self.spec.name)
        if self.stopped_by is not None or trials_to_start(counts, self.options.trials) == 0:
            study.stop()

    # ----- the whole sweep ---------------------------------------------------------------------
    def run(self) -> int:
        import optuna

        started = time.time()
        print_progress(f"study {self.name!r} ({self.options.sampler}, pruner {self.options.pruner}, {self.spec.monitor} {self.spec.mode}) in {self.storage_url}")
        waited = False
        while self.stopped_by is None:
            optuna.storages.fail_stale_trials(self.study)  # a lost trial is failed and its retry queued (WAITING)
            counts = self.counts()
            start = trials_to_start(counts, self.options.trials)
            if start == 0 and counts["finished"] >= self.options.trials:
                break
            if start == 0:
                if not waited:
                    print_progress(f"{counts['running']} trial(s) still running elsewhere: waiting for them (or their heartbeat to stop)")
                waited = True
                time.sleep(min(self.options.heartbeat_interval, 10))
                continue
            try:  # no more trials than the study lacks: a trial running elsewhere may yet be lost and need its retry run here
                self.study.optimize(self.objective, n_trials=start, n_jobs=min(self.options.workers, start), catch=(TrialFailed,),
                                    callbacks=[self.after_trial], gc_after_trial=False)  # fmt: skip
            except ValueError as error:  # Optuna's "Cannot tell a FAIL trial": see TrialAlreadyRecorded
                if not str(error).startswith("Cannot tell a"):
                    raise
                print_progress(f"a trial was already recorded ({error}); going on")
        return self.report(time.time() - started)

    def report(self, seconds: float) -> int:
        import optuna

        counts = self.counts()
        with self.lock:
            best = write_best_config(self.study, self.folder, self.spec.monitor, self.spec.name)
            trials_csv = write_trials_csv(self.study, self.folder)
            plots, skipped = plot_study(self.study, self.folder, self.spec.monitor, self.options.pruner)
        for reason in skipped:
            print_progress(f"plot skipped: {reason}")
        if not self.options.no_wandb and (os.environ.get("WANDB_MODE") != "disabled"):
            log_to_wandb(self.study, self.folder, self.spec.name, plots, best, counts)
        summary = ", ".join(f"{counts[k]} {k}" for k in ("complete", "pruned", "failed", "stopped", "lost", "waiting") if counts[k] or k not in ("stopped", "waiting"))
        print_progress(f"study {self.name!r}: {summary} ({seconds:.0f} s in this command); trials: {trials_csv}; plots: {self.folder / 'plots'}")
        if self.stopped_by is not None:
            code = EXIT_SIGTERM if self.stopped_by == "SIGTERM" else EXIT_SIGINT
            print(paragraph(f"sweep {self.name!r} stopped by {self.stopped_by} after {counts['finished']}/{self.options.trials} trials; "
                            "the same command continues it"), file=sys.stderr)  # fmt: skip
            return code
        if best is None:
            print(paragraph(f"sweep {self.name!r}: no trial completed ({summary}); the errors are in {trials_csv} and {self.folder / 'logs'}"), file=sys.stderr)
            return EXIT_CRASH
        trial = self.study.best_trial
        values = {p.option: p.suggest(optuna.trial.FixedTrial(trial.params)) for p in self.space}
        print(f"best trial {trial.number}: {self.spec.monitor} = {trial.value:.6g} with {json.dumps(values)}\nbest config: {best}")
        return 0

    def stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: stop the running trials (they write last.ckpt and exit) and start no new one."""
        self.stopped_by = signal.Signals(signum).name
        print_progress(f"{self.stopped_by}: stopping the running trials")
        with self.lock:
            for child in self.children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.sweep``; returns the exit code. Optuna's own messages are quietened and its
    experimental-feature warnings ignored for the duration of the command only."""
    import optuna

    argv = list(sys.argv[1:] if argv is None else argv)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's end is reported by after_trial
    try:
        with warnings.catch_warnings():
            # heartbeats and retries are marked experimental by Optuna (since 2.8/2.9); they are what a resumable sweep needs
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            return _main(argv)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _main(argv: list[str]) -> int:
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        options, runner_args = build_parser().parse_known_args(argv)
        sweep = Sweep(options, runner_args)  # everything is checked here, before any trial runs
    except (InputError, ValueError) as error:  # ValueError: an unknown domain, a bad --storage URL
        if debug:
            raise
        print(paragraph(str(error)), file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        signal.signal(signal.SIGTERM, sweep.stop)
        signal.signal(signal.SIGINT, sweep.stop)
        return sweep.run()
    except Exception as error:
        if debug:
            raise
        print(paragraph(crash_message(error, "sweep")), file=sys.stderr)
        return EXIT_CRASH


if __name__ == "__main__":
    raise SystemExit(main())
