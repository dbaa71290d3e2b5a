"""What a sweep leaves in its folder: ``best.yaml``, ``trials.csv``, plots of the study, a W&B run.

Every file is written complete or not at all (a temporary file renamed into place).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from pipelines.files import write_text_atomic
from pipelines.plots import release_pyplot_figure, save_figure_atomic

PRUNING_CALLBACK = "pipelines.sweep_trial.OptunaPruning"
#: Keys of a trial's config.yaml that belong to that one run, not to the recipe.
RUN_ONLY_KEYS = ("run_id", "runs_dir", "ckpt_path", "wandb_group", "wandb_job_type")


def best_config(run_dir: Path) -> dict[str, Any]:
    """The best trial's resolved ``config.yaml`` as a recipe: without its run folder, checkpoint and
    the sweep's pruning callback, so ``--config`` starts a new run with the same settings."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    for key in RUN_ONLY_KEYS:
        config.pop(key, None)
    trainer = config.get("trainer") or {}
    callbacks = [c for c in trainer.get("callbacks") or [] if not (isinstance(c, dict) and c.get("class_path") == PRUNING_CALLBACK)]
    if "callbacks" in trainer:
        trainer["callbacks"] = callbacks or None
    return config


def write_best_config(study: Any, sweep_dir: Path, monitor: str, domain: str) -> Path | None:
    """``best.yaml``: the config of the best COMPLETE trial (a pruned or failed trial is never the best); its
    ``# domain:`` line lets the runner name the domain when the file is given to another one."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if not complete:
        return None
    best = study.best_trial
    run_dir = Path(best.user_attrs["run_dir"])
    config = best_config(run_dir)
    params = ", ".join(f"{k}={v}" for k, v in best.params.items())
    path = sweep_dir / "best.yaml"
    header = (
        f"# Best trial of sweep {study.study_name!r}: trial {best.number}, {monitor} = {best.value:.6g} (run folder {run_dir})\n"
        f"# domain: {domain}\n# searched: {params}\n"
        f"# use: python -m pipelines.run {domain} --config {path}   (or python -m pipelines.retrain {domain} ... --config {path})\n"
    )
    write_text_atomic(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


INHERITED = ("outcome", "error", "exit_code", "pruned_at", "run_dir", "worker")
"""The attributes a retried trial's WAITING copy inherits from the stopped trial until it runs (shown empty in ``trials.csv``)."""


def write_trials_csv(study: Any, sweep_dir: Path) -> Path:
    """``trials.csv``: one row per trial; a retry that has not run yet shows none of the stopped trial's outcome, exit code or run folder."""
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "datetime_start", "datetime_complete", "duration"))
    waiting = frame["state"] == "WAITING" if "state" in frame else None
    if waiting is not None and waiting.any():
        for column in (f"user_attrs_{name}" for name in INHERITED):
            if column in frame:
                frame[column] = frame[column].astype(object).where(~waiting, None)
    path = sweep_dir / "trials.csv"
    write_text_atomic(path, frame.to_csv(index=False))
    return path


def _save(axes: Any, path: Path) -> Path:
    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    figure.set_size_inches(8, 5)
    save_figure_atomic(figure, path)
    release_pyplot_figure(figure)  # Optuna drew it through pyplot
    return path


def plot_study(study: Any, sweep_dir: Path, monitor: str, pruner: str | None = None) -> tuple[dict[str, Path], list[str]]:
    """Optimisation history, parameter importances (fANOVA) and intermediate values, as PNGs in
    ``plots/``. Returns the plots written and, for those that could not be drawn, why."""
    import warnings

    # Optuna draws through pyplot (no backend is forced here: pyplot picks Agg where there is no
    # display, and these figures are only saved, then closed, never shown)
    import optuna
    from optuna.visualization import matplotlib as plots

    folder = sweep_dir / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    written, skipped = {}, []
    drawers = {
        "optimization_history": lambda: plots.plot_optimization_history(study, target_name=monitor),
        "param_importances": lambda: plots.plot_param_importances(study, target_name=monitor),
        "intermediate_values": lambda: plots.plot_intermediate_values(study),
    }
    for name, draw in drawers.items():
        if name == "param_importances" and len(complete) < 2:
            skipped.append(f"{name}: needs 2 complete trials, has {len(complete)}")
            continue
        if name == "intermediate_values" and not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            why = "--pruner none: trials report none" if pruner == "none" else "no trial reached its first validation epoch"
            skipped.append(f"{name}: no trial reported a value during training ({why})")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
                written[name] = _save(draw(), folder / f"{name}.png")
        except (ValueError, RuntimeError) as error:
            skipped.append(f"{name}: {error}")
    return written, skipped


def log_to_wandb(study: Any, sweep_dir: Path, domain: str, plots: dict[str, Path], best_yaml: Path | None, counts: dict[str, int]) -> str | None:
    """One W&B run per sweep (job type ``sweep``, in the sweep's group beside its trials): the
    plots, a table of the trials, the best value and parameters, ``best.yaml`` as an artifact."""
    import wandb

    from pipelines.tracking import wandb_mode

    run_id = re.sub(r"[^A-Za-z0-9_-]", "-", f"{study.study_name}-study")[:64]
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", f"domain-pipelines-{domain}"), id=run_id, name=run_id, group=study.study_name,
        job_type="sweep", dir=str(sweep_dir), resume="allow", config={"space": study.user_attrs.get("space"), "domain": domain}, mode=wandb_mode(),
    )  # fmt: skip
    try:
        frame = study.trials_dataframe(attrs=("number", "value", "state", "params"))
        frame = frame.astype({c: str for c in frame.columns if frame[c].dtype == object})
        run.log({"sweep/trials": wandb.Table(dataframe=frame), **{f"sweep/{k}": wandb.Image(str(p)) for k, p in plots.items()}})
        run.summary.update({f"sweep/{k}": v for k, v in counts.items()})
        if best_yaml is not None:
            run.summary.update({"sweep/best_value": study.best_value, "sweep/best_trial": study.best_trial.number, "sweep/best_params": study.best_params})
            artifact = wandb.Artifact(f"{run_id}-best", type="config")
            artifact.add_file(str(best_yaml), name="best.yaml")
            run.log_artifact(artifact)
    finally:
        wandb.finish()
    return run_id


def error_line(log: Path) -> str:
    """The runner's ``error: ...`` paragraph at the end of a trial's log, joined into one line."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    start = max((i for i, line in enumerate(lines) if line.startswith("error: ")), default=None)
    if start is None:
        tail = [line.strip() for line in lines if line.strip()][-1:]
        return tail[0][:500] if tail else ""
    paragraph = [lines[start]] + [line for line in lines[start + 1 :] if line.startswith("  ")]
    return " ".join(line.strip() for line in paragraph).removeprefix("error: ")[:1000]


def print_progress(text: str) -> None:
    print(f"[sweep] {text}", file=sys.stderr, flush=True)
