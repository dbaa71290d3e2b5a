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
   champion pointer, the history row; then ``--keep N`` retention.

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
import json
import os
import secrets
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pipelines import evaluation_set
from pipelines.fingerprint import absolute_paths, fingerprint
from pipelines.model_registry import REGISTRY_ENV, ModelRegistry, RegistryError, RegistryLocked, default_registry
from pipelines.registry_upkeep import check_writable
from pipelines.retrain_steps import ExitCode, RetrainError, cuda_devices, resolve_config, run_step
from pipelines.selection import Selection, floor_text, parse_floor

__all__ = ["ExitCode", "RetrainError", "main"]
RESERVED_RUNNER_OPTIONS = ("--run_id", "--ckpt_path")
USAGE = "usage: python -m pipelines.retrain DOMAIN [--registry DIR] [--metric test/X] [--margin M] [--floor 'test/X>=V'] [--warm_start] [--keep N] [runner options: --config, --data.X, --model.X, --trainer.X, --runs_dir]"


class Attempt:
    """One retraining attempt of one domain (the caller holds the registry lock)."""

    def __init__(self, options: argparse.Namespace, runner_args: list[str], selection: Selection) -> None:
        from pipelines.domain_registry import get_domain

        self.options, self.runner_args, self.selection = options, runner_args, selection
        self.spec = get_domain(options.domain)
        self.registry = ModelRegistry(options.registry, self.spec.name)
        self.group = options.wandb_group or f"retrain-{self.spec.name}"  # every W&B run of the attempt, and its artifact
        # a requeued SLURM job is the same attempt: it resumes its run folder from last.ckpt
        slurm_job = os.environ.get("SLURM_JOB_ID") if os.environ.get("SLURM_JOB_NAME") not in (None, "bash", "interactive") else None
        self.attempt_id = f"retrain-slurm-{slurm_job}" if slurm_job else "retrain-" + time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        self.started = time.time()
        self.row: dict[str, Any] = {
            "attempt": self.attempt_id, "domain": self.spec.name, "metric": selection.preference[0], "margin": options.margin,
            "floors": [floor_text(f) for f in selection.sanity + selection.floors], "argv": sys.argv,
        }  # fmt: skip

    def run(self) -> ExitCode:
        from pipelines.registry_upkeep import reconcile_orphans
        from pipelines.runs import git_commit

        self.row["git_commit"] = git_commit()
        removed = self.registry.remove_partial_versions()
        if removed:
            print(f"[retrain] removed interrupted version folders {removed} from {self.registry.versions_dir}", file=sys.stderr)
        for row in reconcile_orphans(self.registry):
            print(f"[retrain] reconciled orphan version {row['challenger']['version']} of an interrupted attempt: {row['decision']}", file=sys.stderr)
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
        evaluation, pinned = self._evaluation_set(config)

        runs_dir = Path(config.get("runs_dir") or "runs")
        run_dir = runs_dir / self.spec.name / self.attempt_id
        self.row["run_dir"] = str(run_dir)
        train_args = [self.spec.name, "fit", *self.runner_args, "--run_id", self.attempt_id]
        if (run_dir / "checkpoints" / "last.ckpt").is_file():  # the same attempt, requeued after preemption
            train_args += ["--ckpt_path", "last"]  # the runner replays the killed segment's epochs to W&B (ReplayMetrics)
        if self.options.warm_start and champion:
            weights = self.registry.version_dir(champion) / "model.safetensors"
            train_args += ["--trainer.callbacks+=pipelines.warm_start.WarmStart", f"--trainer.callbacks.weights={weights}"]
            self.row["warm_start"] = champion
        run_step(train_args, self.options.launcher, child=True, group=self.group)  # DDP workers re-run the child's command line
        best = run_dir / "checkpoints" / "best.ckpt"
        if not best.is_file():
            raise RetrainError(ExitCode.FAILED, f"training finished without {best} (no validation ran? check --trainer.limit_val_batches)")

        challenger = self._score(best, config, runs_dir, run_dir, "challenger", evaluation)
        self.row["challenger"] = challenger
        if champion:
            with_champion = run_dir / f"champion-{champion}.ckpt"
            self.registry.write_checkpoint(champion, with_champion)
            try:
                result = self._score(with_champion, self._version_config(champion), runs_dir, run_dir, f"champion-{champion}", evaluation)
                self.row["champion"] = {"version": champion, **result}
            finally:
                with_champion.unlink(missing_ok=True)
        baseline = None
        if self.selection.needs_baseline:  # a trivial baseline every domain has: the same network, untrained
            untrained = self._untrained_checkpoint(best, run_dir / "untrained.ckpt")
            try:
                baseline = self._score(untrained, config, runs_dir, run_dir, "untrained", evaluation)["metrics"]
            finally:
                untrained.unlink(missing_ok=True)
            self.row["baseline"] = baseline
        try:
            decision, reason, metric, mode = self.selection.decide(challenger["metrics"], self.row["champion"] if champion else None, self.options.margin, baseline)
        except LookupError as error:
            raise RetrainError(ExitCode.FAILED, str(error)) from None
        self.row.update(reason=reason, metric=metric, mode=mode)
        challenger["score"] = challenger["metrics"][metric]
        if champion:
            self.row["champion"]["score"] = self.row["champion"]["metrics"].get(metric)
        print(f"[retrain] {reason}", file=sys.stderr)

        if SIGNALS:  # a SIGTERM that some library code swallowed (or a runner that finished regardless)
            raise RetrainError(ExitCode.FAILED, f"terminated ({', '.join(SIGNALS)}) during the attempt: nothing is registered")
        if decision and not pinned:  # the evaluation set is pinned with the first champion, never by a failed attempt
            self.registry.pin_evaluation(evaluation)
            print(f"[retrain] pinned the evaluation set (a snapshot in {self.registry.path / 'evaluation'})", file=sys.stderr)
        version = self._add_version(best, print_, challenger, evaluation, decision, reason, champion)
        challenger["version"] = version
        if decision:
            self.registry.set_champion(version, f"retrain {self.attempt_id}: {reason}")
        self.row["decision"] = "promoted" if decision else "rejected"
        from pipelines.registry_cli import publish_to_wandb

        self.row["wandb"] = publish_to_wandb(self.registry, version, ["candidate", *(["champion"] if decision else [])], self.group)
        return ExitCode.PROMOTED if decision else ExitCode.KEPT_CHAMPION

    def _add_version(self, best: Path, print_: dict, challenger: dict, evaluation: dict, decision: bool, reason: str, champion: str | None) -> str:
        import yaml

        config = self.config
        datamodule_key = self.spec.datamodule_class.rpartition(".")[2]
        model_class = config["model"].get("class_path") if isinstance(config["model"], dict) else None
        intent = {"promote": decision, "reason": reason, "against": champion, "champion_score": (self.row["champion"] or {}).get("score")}
        return self.registry.add_version(
            best,
            yaml.safe_dump(config, sort_keys=False),
            {
                "fingerprint": print_["digest"], "data_files": print_["files"], "metric": self.row["metric"], "mode": self.row["mode"],
                "score": challenger["score"], "metrics": challenger["metrics"], "evaluation": evaluation["fingerprint"],
                "run_dir": self.row["run_dir"], "attempt": self.attempt_id, "git_commit": self.row["git_commit"],
                "model_class": model_class or self.spec.model_class, "datamodule_class": self.spec.datamodule_class,
                "warm_start": self.row.get("warm_start"), "decision": intent,
            },
            datamodule_key,
        )  # fmt: skip

    def _untrained_checkpoint(self, best: Path, path: Path) -> Path:
        """``best`` with the weights of a freshly initialised model (same class, hyper-parameters,
        seed and fitted preprocessing): the untrained baseline of the ``baseline`` floors."""
        import torch

        from pipelines.checkpoints import model_class, read_checkpoint
        from pipelines.model_registry import TRAINING_STATE_KEYS

        checkpoint = read_checkpoint(best)
        class_path = self.config["model"].get("class_path") if isinstance(self.config["model"], dict) else None
        model_type = model_class(self.spec, class_path, str(best))  # from this attempt's own resolved config
        torch.manual_seed(int(self.config.get("seed_everything") or 0))
        model = model_type(**{k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")})
        torch.save({**{k: v for k, v in checkpoint.items() if k not in TRAINING_STATE_KEYS}, "state_dict": model.state_dict()}, path)
        return path

    def _already_decided(self, digest: str, champion: str | None, champion_meta: dict[str, Any] | None) -> str | None:
        """Why this fingerprint is nothing new: it is the champion's, or a challenger with it was
        already rejected against this same champion (so a nightly job does not retrain it forever)."""
        if champion_meta and champion_meta.get("fingerprint") == digest:
            return f"is the champion's ({champion})"
        for row in reversed(self.registry.history()):
            if row.get("decision") == "rejected" and row.get("fingerprint") == digest and (row.get("champion") or {}).get("version") == champion:
                return f"was already rejected against champion {champion} (attempt {row.get('attempt')}, {row.get('time')})"
        return None

    def _evaluation_set(self, config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the evaluation record, whether it is already pinned). Unpinned: a fresh snapshot of
        ``--eval_config``'s data (or this attempt's), pinned later only if this attempt promotes."""
        pinned = self.registry.evaluation()
        requested = resolve_config(self.spec.name, ["--config", str(self.options.eval_config)])["data"] if self.options.eval_config else None
        if pinned is None:
            return evaluation_set.snapshot(self.registry, requested if requested is not None else config["data"]), False
        if requested is not None and absolute_paths(requested) != pinned.get("source", pinned["data"]):
            raise RetrainError(ExitCode.USAGE, f"--eval_config {self.options.eval_config} differs from the evaluation set pinned in {self.registry.path / 'evaluation.json'}; replace it with `python -m pipelines.registry {self.spec.name} repin --reason ... --eval_config {self.options.eval_config}`")
        evaluation_set.check(self.registry, pinned)
        return pinned, True

    def _distributed_training(self) -> bool:
        """Whether training ran in several processes (a launcher, or devices x num_nodes > 1): then each
        evaluation runs in a fresh single-process child, free of the training's process group."""
        from pipelines.hardware import count_devices

        trainer = self.config["trainer"]
        accelerator = trainer.get("accelerator") or "auto"
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not cuda_devices())
        devices = count_devices(trainer.get("devices") or "auto", 1 if on_cpu else cuda_devices())
        return bool(self.options.launcher) or devices * int(trainer.get("num_nodes") or 1) > 1

    def _version_config(self, version: str) -> dict[str, Any]:
        import yaml

        return yaml.safe_load((self.registry.version_dir(version) / "config.yaml").read_text()) or {}

    def _score(self, checkpoint: Path, model_config: dict, runs_dir: Path, run_dir: Path, label: str, evaluation: dict) -> dict[str, Any]:
        result = evaluation_set.score(
            self.spec.name, evaluation, checkpoint, model_config, self.config, runs_dir, f"{self.attempt_id}-eval-{label}",
            run_dir / f"evaluation-{label}.yaml", child=self._distributed_training(), group=self.group,
        )  # fmt: skip
        shown = {k: round(v, 4) for k, v in result["metrics"].items() if k in self.selection.preference}
        print(f"[retrain] {label} on the evaluation set: {json.dumps(shown)}", file=sys.stderr)
        return result

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
    )  # fmt: skip
    parser.add_argument("domain")
    parser.add_argument("--registry", type=Path, default=None, help=f"registry folder (default: ${REGISTRY_ENV} or ./registry)")
    parser.add_argument("--metric", default=None, help="the test metric that selects the champion (default: the domain's selection, e.g. finance: test/auprc where labels exist, else test/loss)")
    parser.add_argument("--margin", type=float, default=0.0, help="promote only when the challenger beats the champion by more than this, in the metric's direction (default 0: strictly better; negative: accept at most that much worse)")
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
    options, runner_args = parse_args(argv)
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


#: signals received during this process's attempt (checked again before anything is promoted)
SIGNALS: list[str] = []


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
        return code
    except Terminated as error:
        print(f"[retrain] failed: {error}", file=sys.stderr)
        attempt.record(ExitCode.FAILED, str(error))
        return ExitCode.FAILED
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - every failure is recorded in the history
        traceback.print_exc()
        attempt.record(ExitCode.FAILED, f"{type(error).__name__}: {error}")
        return ExitCode.FAILED
    attempt.record(code)
    print(f"[retrain] {attempt.row['decision']} (exit {int(code)})", file=sys.stderr)
    if options.keep:
        _retention(attempt, options.keep)
    return code


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
