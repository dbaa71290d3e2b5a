"""One retraining attempt of one domain, steps 1 to 6 of :mod:`pipelines.retrain` (the caller holds
the registry lock): fingerprint, train, evaluate challenger and champion, decide, record.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines import evaluation_set
from pipelines.fingerprint import absolute_paths, fingerprint
from pipelines.model_registry import ModelRegistry
from pipelines.retrain_steps import ExitCode, RetrainError, cuda_devices, resolve_config, run_step
from pipelines.selection import Selection, floor_text

#: signals received during this process's attempt (checked again before anything is promoted)
SIGNALS: list[str] = []


@contextlib.contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Hold a SIGTERM until the block is done: the handler in force runs on leaving. (Not ``pthread_sigmask``: a
    process-directed signal then reaches another thread, W&B's or Lightning's, and Python runs the handler in the
    main thread at once.) From the main thread only, as ``signal.signal`` requires."""
    held: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if held and callable(previous):
            previous(signal.SIGTERM, None)
        elif held and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)


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
        from pipelines.run_folder import git_commit

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
        if champion:  # the data must have the champion's schema (DomainSpec.schema_options): refused before anything is written
            from pipelines.retrain_schema import check as check_schema

            check_schema(self.spec, self.registry, champion, config["data"])
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
        units_differ: list[str] = []
        if champion:
            with_champion = run_dir / f"champion-{champion}.ckpt"
            self.registry.write_checkpoint(champion, with_champion)
            aligned = evaluation_set.align_scoring_options(with_champion, best, self.spec.scoring_options)
            if aligned:
                changes = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in aligned.items())
                print(f"[retrain] champion {champion} is scored with this attempt's scoring options, like the challenger: {changes}", file=sys.stderr)
            try:
                result = self._score(with_champion, self._version_config(champion), runs_dir, run_dir, f"champion-{champion}", evaluation)
                self.row["champion"] = {"version": champion, **result}
                units_differ = self._units_differences(with_champion, best)
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
            decision, reason, metric, mode = self.selection.decide(challenger["metrics"], self.row["champion"] if champion else None, self.options.margin, baseline, units_differ)
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
        with sigterm_deferred():  # the pointer and the row's decision change together: a SIGTERM lands after both
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

    def _units_differences(self, champion_checkpoint: Path, challenger_checkpoint: Path) -> list[str]:
        """How the two models' fitted preprocessing differs in units (``DomainSpec.units_differences``; empty without one)."""
        if not self.spec.units_differences:
            return []
        import importlib

        from pipelines.checkpoints import read_checkpoint

        module, _, name = self.spec.units_differences.rpartition(".")
        compare = getattr(importlib.import_module(module), name)  # the registered domain's own code, never a name read from a file
        key = self.spec.datamodule_class.rpartition(".")[2]
        return list(compare(read_checkpoint(champion_checkpoint).get(key) or {}, read_checkpoint(challenger_checkpoint).get(key) or {}))

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
        return evaluation_set.for_attempt(self.registry, pinned, config["data"]), True

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
