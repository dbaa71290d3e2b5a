"""``python -m pipelines.retrain DOMAIN [--registry DIR] [retrain options] [runner options]``.

One command for a scheduler (cron, a Kubernetes CronJob, SLURM, Airflow): safe to call at any
time, it never puts a worse, diverged or half-written model in production. Works for every
registered domain with no domain code (``docs/retraining.md`` has the whole design).

0. **Check** before anything is written: options, ``--metric``/``--floor`` names against the
   domain's declared test metrics (:mod:`pipelines.selection`), and a writable registry with room
   for a new version. A bad name exits 2, an unwritable or full registry exits 1, each with one line.
1. **Lock** ``REGISTRY/<domain>/.lock`` (``fcntl.flock``, released by the kernel if the process
   dies); held elsewhere: exit 5 at once. Then reconcile orphan versions of killed attempts
   (:mod:`pipelines.registry_upkeep`).
2. **Fingerprint** the training data (:func:`pipelines.fingerprint.fingerprint`); equal to the
   champion's, or already rejected against the same champion: exit 4 (``--force`` trains anyway).
3. **Train** a challenger with the runner (``pipelines.run DOMAIN fit``) in ``runs/<domain>/<id>/``;
   ``--warm_start`` loads the champion's weights first (:mod:`pipelines.warm_start`).
4. **Evaluate** challenger and champion on the registry's evaluation snapshot
   (:mod:`pipelines.evaluation_set`: a content-addressed copy of the evaluation data the registry
   owns, so a refreshed ``latest.npz`` never breaks the next night). It is pinned only together
   with the first promotion: a failed or rejected attempt never pins.
5. **Decide** on the domain's selection metric (or ``--metric``): the challenger must pass the
   domain's sanity floors and every ``--floor``, and beat the champion by more than ``--margin``.
6. **Record**: the version (with the decision, so an interrupted promotion can be finished), the
   champion pointer, the history row; then the decision as a W&B run (champion and challenger
   scores, decision, reason, version: :mod:`pipelines.retrain_wandb`; a W&B failure is a warning,
   never a changed decision) and ``--keep N`` retention.

Exit codes (:class:`ExitCode`): 0 promoted, 3 kept champion (challenger rejected, also when a first
model fails the floors), 4 nothing new, 5 locked, 1 failed, 2 bad command line. Any non-zero exit
of the runner is a failed attempt: nothing is pinned or promoted.

Training runs the runner as a child process (``python -m pipelines.run DOMAIN fit ...``, W&B group
and job type on its command line), so its own DDP works here: Lightning re-launches that child's
command for each worker rank. A SIGTERM to this command reaches the child, which keeps its
``last.ckpt``; if this command is killed, Linux kills the child too. Evaluations run on one device
in this process; after a distributed training in a fresh child. On SLURM run this command in
the batch step with ``--launcher srun`` (``deploy/retrain.sbatch``); a requeued job is the same
attempt (``retrain-slurm-<job id>``) and resumes its training from ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from pipelines.model_registry import REGISTRY_ENV, ModelRegistry, RegistryError, RegistryLocked, default_registry
from pipelines.option_spelling import OneLineParser
from pipelines.registry_upkeep import check_writable
from pipelines.retrain_attempt import SIGNALS, Attempt, sigterm_deferred
from pipelines.retrain_steps import ExitCode, RetrainError
from pipelines.selection import Selection, parse_floor

__all__ = ["ExitCode", "RetrainError", "main"]
RESERVED_RUNNER_OPTIONS = ("--run_id", "--ckpt_path")
USAGE = "usage: python -m pipelines.retrain DOMAIN [--registry DIR] [--metric test/X] [--margin M] [--floor 'test/X>=V'] [--warm_start] [--keep N] [--wandb_group G] [runner options: --config, --data.X, --model.X, --trainer.X, --runs_dir]"


# ----- command line ----------------------------------------------------------------------------
def finite_float(text: str) -> float:
    """A finite number (``nan`` and ``inf`` are refused: every comparison with them is false or true alike)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number (e.g. 0.01, 0 or -0.005)")
    return value


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split retrain options from the runner options (everything else, passed on unchanged)."""
    parser = OneLineParser(prog="python -m pipelines.retrain", usage=USAGE.removeprefix("usage: "), allow_abbrev=False, description=__doc__.split("\n\n")[1],
        epilog="exit codes: " + ", ".join(f"{int(code)} {code.name.lower().replace('_', ' ')}" for code in ExitCode)
        + ". Every other option goes to the runner (python -m pipelines.run DOMAIN --help lists them).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("domain")
    parser.add_argument("--registry", type=Path, default=None, help=f"registry folder (default: ${REGISTRY_ENV} or ./registry)")
    parser.add_argument("--metric", default=None, help="the test metric that selects the champion (default: the domain's selection, e.g. finance: test/auprc where labels exist, else test/loss)")
    parser.add_argument("--margin", type=finite_float, default=0.0, help="promote only when the challenger beats the champion by more than this, in the metric's direction (default 0: strictly better; negative: accept at most that much worse)")
    parser.add_argument("--floor", type=parse_floor, action="append", default=[], help="a test metric the challenger must pass, e.g. 'test/auroc>=0.7' (repeatable; on top of the domain's sanity floors)")
    parser.add_argument("--warm_start", action="store_true", help="start training from the champion's weights (weights only)")
    parser.add_argument("--eval_config", type=Path, default=None, help="YAML whose data section is the evaluation set, snapshotted into the registry with the first champion (default: the data of that attempt)")
    parser.add_argument("--keep", type=int, default=None, help="retention: keep the N newest versions and attempt run folders (never the champion, its rollback chain or an aliased version)")
    parser.add_argument("--launcher", type=shlex.split, default=None, help="command prefix that starts the training step as a child process on every task, e.g. 'srun' on SLURM")
    parser.add_argument("--wandb_group", default=None, help="W&B group of the attempt's runs and of the model artifact (default: retrain-DOMAIN)")
    parser.add_argument("--force", action="store_true", help="train even when the fingerprint equals the champion's")
    options, runner_args = parser.parse_known_args(argv)
    for arg in runner_args:
        if arg.split("=")[0] in RESERVED_RUNNER_OPTIONS:
            parser.error(f"{arg.split('=')[0]} is chosen by retrain (one run folder per attempt)")
        if not arg.startswith("-") and runner_args.index(arg) == 0:
            parser.error(f"unexpected {arg!r}: retrain runs fit and test itself; give only options")
    if options.keep is not None and options.keep < 1:
        parser.error(f"--keep {options.keep}: keep at least 1 version")
    if options.eval_config is not None and not options.eval_config.is_file():
        parser.error(f"--eval_config {options.eval_config}: no such file")
    options.registry = options.registry or default_registry()
    return options, runner_args


def main(argv: list[str] | None = None) -> int:
    """Run one retraining attempt; return its :class:`ExitCode`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("exit codes: " + ", ".join(f"{int(code)} {code.name.lower().replace('_', ' ')}" for code in ExitCode))
        return 0 if argv else ExitCode.USAGE
    from pipelines.retrain_gate import gate  # --when drift: retrain only when the data moved (pipelines/retrain_gate.py)

    try:  # a usage error is one line and exit 2 (OneLineParser), returned rather than raised
        skipped, argv = gate(argv)
        if skipped is not None:
            return skipped
        options, runner_args = parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else ExitCode.USAGE
    from pipelines.domain_registry import get_domain

    try:
        selection = Selection.for_domain(get_domain(options.domain), options.metric, options.floor)
    except ValueError as error:
        print(f"[retrain] error: {error}", file=sys.stderr)
        return ExitCode.USAGE
    registry = ModelRegistry(options.registry, options.domain)
    try:
        check_writable(registry)
        with registry.lock():
            check_writable(registry)  # again under the lock: an earlier holder may have filled the disk
            SIGNALS.clear()  # this attempt's signals only (main may run several attempts in one process)
            previous = signal.signal(signal.SIGTERM, _terminated)  # a SIGTERM is recorded as a failed attempt
            try:
                return _attempt(options, runner_args, selection)
            finally:
                signal.signal(signal.SIGTERM, previous)
    except RegistryLocked as error:
        print(f"[retrain] locked: {error}; nothing done (exit {int(ExitCode.LOCKED)})", file=sys.stderr)
        return ExitCode.LOCKED
    except RegistryError as error:
        print(f"[retrain] error: {error}", file=sys.stderr)
        return ExitCode.FAILED


class Terminated(BaseException):
    """SIGTERM ends the attempt as failed. A ``BaseException``, so that no library's ``except
    Exception`` swallows it; :data:`SIGNALS` keeps the fact even if something does."""


def _terminated(signum: int, frame: Any) -> None:
    SIGNALS.append("SIGTERM")
    raise Terminated("terminated (SIGTERM)")


def _attempt(options: argparse.Namespace, runner_args: list[str], selection: Selection) -> ExitCode:
    attempt = Attempt(options, runner_args, selection)
    try:
        code = attempt.run()
    except (RetrainError, RegistryError) as error:
        code = getattr(error, "code", ExitCode.FAILED)
        print(f"[retrain] {'usage' if code == ExitCode.USAGE else 'failed'}: {error}", file=sys.stderr)
        attempt.record(code, str(error))
        if code != ExitCode.USAGE:  # a refused command line or data trained nothing: one line, no W&B run
            _log_decision(attempt)
        return code
    except Terminated as error:
        decided = attempt.row.get("decision")
        if decided in ("promoted", "rejected"):  # after the registry holds the decision (the model's W&B upload): it stands
            code = ExitCode.PROMOTED if decided == "promoted" else ExitCode.KEPT_CHAMPION
            with sigterm_deferred():
                attempt.record(code)
            print(f"[retrain] stopped (SIGTERM) after the decision was recorded ({decided}, exit {int(code)}); the model was not logged to W&B", file=sys.stderr)
            return code
        print(f"[retrain] failed: {error}", file=sys.stderr)
        attempt.record(ExitCode.FAILED, str(error))
        return ExitCode.FAILED  # stopping: no W&B run is started now
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - every failure is recorded in the history
        traceback.print_exc()
        attempt.record(ExitCode.FAILED, f"{type(error).__name__}: {error}")
        if isinstance(error, Exception):  # Ctrl+C: stopping, no W&B run is started now
            _log_decision(attempt)
        return ExitCode.FAILED
    try:
        with sigterm_deferred():  # the decision is recorded whole: a SIGTERM now lands right after it
            attempt.record(code)
        print(f"[retrain] {attempt.row['decision']} (exit {int(code)})", file=sys.stderr)
        if SIGNALS:  # one that some library code swallowed after the decision
            raise Terminated("terminated (SIGTERM)")
        _log_decision(attempt)
        if options.keep:
            _retention(attempt, options.keep)
    except Terminated:  # after the decision: it stands, and the exit code says it (a retry would train again)
        print(f"[retrain] stopped (SIGTERM) after the decision was recorded ({attempt.row['decision']}, exit {int(code)}); "
              "W&B logging or --keep retention not finished: the next run with --keep finishes the retention", file=sys.stderr)  # fmt: skip
    return code


def _log_decision(attempt: Attempt) -> None:
    """The recorded decision to W&B (:mod:`pipelines.retrain_wandb`); it never changes the attempt's exit code."""
    from pipelines.retrain_wandb import log_decision

    try:
        print(f"[retrain] {log_decision(attempt.row, attempt.group)}", file=sys.stderr)
    except Terminated:
        print("[retrain] stopped (SIGTERM) while logging the decision to W&B; the decision is recorded in the registry's history", file=sys.stderr)


def _retention(attempt: Attempt, keep: int) -> None:
    """``--keep N`` after the attempt is recorded; a failure here never changes the attempt's exit code."""
    from pipelines.registry_upkeep import known_runs_dirs, prune

    runs_dirs = [*known_runs_dirs(attempt.registry), Path(attempt.config.get("runs_dir") or "runs") / attempt.spec.name] if hasattr(attempt, "config") else known_runs_dirs(attempt.registry)
    try:
        result = prune(attempt.registry, keep, runs_dirs, attempt.attempt_id)
    except OSError as error:
        print(f"[retrain] retention (--keep {keep}) failed, nothing lost: {error}", file=sys.stderr)
        return
    if any(result.values()):
        print(f"[retrain] retention --keep {keep}: removed versions {result['removed'] or 'none'}, {len(result['run_folders'])} run folder(s)", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
