"""A hyper-parameter sweep (``pipelines.sweep``) against today's defaults, on BreastMNIST and ADBench campaign.

    python -m benchmarks.sweep [--trials 20] [--workers 1] [--data breastmnist campaign] [--pruner median] [--smoke] [--max_epochs N]

For each data set: one run with the benchmark's defaults (``benchmarks/healthcare_breastmnist.py``,
``benchmarks/finance_adbench.py``: the same data, epochs and fixed options), then a sweep of
``--trials`` trials (TPE, median pruning) over the space below, every trial a normal
``pipelines.run`` (fit, then test of its best checkpoint). Reported: the domain's validation
objective (``val/auroc`` for healthcare, ``val/loss`` for finance) of the defaults and of the best
trial, then the test scores of those two configurations (read once, after the sweep chose on
validation only), the sweep's wall time and how many trials were pruned or failed. The table is
appended to ``benchmarks/RESULTS.md``; JSON goes to ``benchmarks/results/sweep.json``.

The full size (20 trials x 2 data sets, about 2 h for BreastMNIST and 30 min for campaign on 2
cores) is for a quiet machine; ``--max_epochs N`` gives the defaults and every trial one smaller
epoch budget (the table's heading names it). ``--smoke`` proves the command end to end in minutes: 2 trials of
1 epoch on a few batches; its table is printed and written to ``results/sweep-smoke.json`` only,
never to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import RESULTS, SHARED_DATA, child_env, print_table, require, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

#: per data set: the domain, its file, the fixed runner options of its benchmark, the test metric, the space
DATASETS: dict[str, dict[str, Any]] = {
    "breastmnist": {
        "domain": "healthcare", "file": "healthcare/breastmnist.npz", "data_option": "--data.npz_path", "test_metric": "test/auroc",
        "fixed": ["--model.network=resnet18", "--model.width=0.5", "--model.small_input_stem=true", "--model.lr=0.001",
                  "--model.weight_decay=0.0001", "--model.lr_schedule=cosine", "--data.batch_size=128", "--data.balance=none",
                  "--data.image_size=28", "--trainer.max_epochs=100"],
        "space": {"model.lr": {"low": 1e-4, "high": 3e-3, "log": True}, "model.weight_decay": {"low": 1e-6, "high": 1e-3, "log": True},
                  "model.width": {"choices": [0.25, 0.5, 1.0]}, "data.balance": {"choices": ["none", "class_weights"]}},
    },
    "campaign": {
        "domain": "finance", "file": "finance/campaign.npz", "data_option": "--data.path", "test_metric": "test/auroc",
        "fixed": ["--data.mode=semi_supervised", "--data.val_fraction=0.1", "--data.test_fraction=0.4", "--model.architecture=autoencoder",
                  "--model.hidden_dims=[128, 64]", "--model.latent_dim=16", "--trainer.max_epochs=20"],
        "space": {"model.lr": {"low": 3e-4, "high": 1e-2, "log": True}, "model.latent_dim": {"choices": [4, 8, 16, 32]},
                  "model.hidden_dims": {"choices": [[64, 32], [128, 64], [512, 256]]}, "model.weight_decay": {"low": 1e-7, "high": 1e-3, "log": True}},
    },
}  # fmt: skip
SMOKE = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2"]


def run(command: list[str], log: Path) -> float:
    """Run a command (output to ``log``); its wall seconds. A non-zero exit stops the benchmark."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{' '.join(command[:6])} ... exited {code}; see {log}")
    return time.perf_counter() - started


def benchmark(name: str, trials: int, workers: int, pruner: str, smoke: bool, folder: Path, max_epochs: int | None = None) -> dict[str, Any]:
    import optuna

    spec = DATASETS[name]
    fixed = [option for option in spec["fixed"] if not (max_epochs and option.startswith("--trainer.max_epochs="))]
    if max_epochs:  # one smaller epoch budget for the defaults and every trial alike
        fixed.append(f"--trainer.max_epochs={max_epochs}")
    fixed = [spec["data_option"], str(require(SHARED_DATA / spec["file"])), *fixed, "--trainer.enable_progress_bar=false", *(SMOKE if smoke else [])]
    runs = folder / "runs"
    defaults_id = f"defaults-{name}"
    default_seconds = run([sys.executable, "-m", "pipelines.run", spec["domain"], *fixed, "--runs_dir", str(runs), "--run_id", defaults_id], folder / "logs" / f"{defaults_id}.log")
    defaults = json.loads((runs / spec["domain"] / defaults_id / "summary.json").read_text())

    space = folder / f"{name}.yaml"
    space.write_text(yaml.safe_dump(spec["space"]))
    sweep = [sys.executable, "-m", "pipelines.sweep", spec["domain"], f"--space={space}", f"--trials={trials}", f"--workers={workers}",
             f"--pruner={pruner}", f"--sweeps_dir={folder / 'sweeps'}", f"--runs_dir={runs}", "--no_wandb", *fixed]  # fmt: skip
    sweep_seconds = run(sweep, folder / "logs" / f"sweep-{name}.log")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'sweeps' / spec['domain'] / name / 'study.db'}")
    outcomes = [t.user_attrs.get("outcome", "lost") for t in study.trials]
    best = study.best_trial
    best_summary = json.loads((Path(best.user_attrs["run_dir"]) / "summary.json").read_text())  # its test, read once, after choosing on validation
    metric = spec["test_metric"]
    return {
        "data": name, "domain": spec["domain"], "trials": len(study.trials), "complete": outcomes.count("complete"), "pruned": outcomes.count("pruned"),
        "failed": outcomes.count("failed") + outcomes.count("lost"), "monitor": study.user_attrs.get("monitor"),
        "default_val": defaults["best_score"], "best_val": best.value, "default_test": defaults["test"][metric], "best_test": best_summary["test"][metric],
        "test_metric": metric, "best_params": best.params, "sweep_seconds": sweep_seconds, "default_seconds": default_seconds,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="trials at once (each a process)")
    parser.add_argument("--data", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    parser.add_argument("--smoke", action="store_true", help="2 trials of 1 epoch on a few batches; not written to RESULTS.md")
    parser.add_argument("--max_epochs", type=int, help="replaces the data set's fixed epoch count, for the defaults and every trial alike")
    args = parser.parse_args(argv)
    if args.max_epochs is not None and args.max_epochs < 1:
        parser.error(f"--max_epochs {args.max_epochs}: expected a whole number of epochs >= 1")
    trials = 2 if args.smoke else args.trials
    folder = RESULTS / ("sweep-smoke" if args.smoke else "sweep") / time.strftime("%Y%m%d-%H%M%S")
    rows = [benchmark(name, trials, args.workers, args.pruner, args.smoke, folder, args.max_epochs) for name in args.data]
    table = print_table(
        ["data set (domain)", "trials (complete/pruned/failed)", "objective", "val: defaults", "val: best trial", "test metric",
         "test: defaults", "test: best trial", "sweep wall min"],
        [[f"{r['data']} ({r['domain']})", f"{r['trials']} ({r['complete']}/{r['pruned']}/{r['failed']})", r["monitor"], r["default_val"], r["best_val"],
          r["test_metric"], r["default_test"], r["best_test"], r["sweep_seconds"] / 60] for r in rows],
    )  # fmt: skip
    write_results("sweep-smoke" if args.smoke else "sweep", {"args": vars(args), "rows": rows, "table": table, "folder": str(folder)})
    if not args.smoke:
        best = "; ".join(f"{r['data']}: {json.dumps(r['best_params'])}" for r in rows)
        budget = f" --max_epochs {args.max_epochs}" if args.max_epochs else ""
        section = (f"\n## Sweep vs defaults (`python -m benchmarks.sweep --data {' '.join(args.data)} --trials {trials} --workers {args.workers} --pruner {args.pruner}{budget}`, "
                   f"{time.strftime('%Y-%m-%d')})\n\n{table}\n\n- Chosen on validation only; each configuration's test score read once. Best: {best}\n")  # fmt: skip
        with open(RESULTS_MD, "a") as out:
            out.write(section)
        print(f"appended to {RESULTS_MD}")


if __name__ == "__main__":
    main()
