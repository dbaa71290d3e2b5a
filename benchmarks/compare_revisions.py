"""Did a change make training faster or slower? Two git revisions' training throughput, side by side.

    python -m benchmarks.compare_revisions --base HEAD~1 [--domains finance autonomous] [--repeats 3] [--epochs 6] [-- RUN OPTIONS]

Checks ``--base`` out into a temporary git worktree and runs ``pipelines.run DOMAIN fit`` from it and
from this working tree (uncommitted changes included), alternating base and head in each repeat so
that load on the machine falls on both alike. Anything after ``--`` goes to every run, for example
``-- --config pipelines/configs/ddp_sim.yaml`` for DDP on 2 CPU processes. Throughput is training
samples/s of rank zero per epoch (``benchmarks.common.TrainingThroughput``; validation is off), the
first epoch of each run dropped as warm-up. Prints medians and the head/base ratio per domain;
writes ``benchmarks/results/compare_revisions.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, child_env, print_table, write_results


def epoch_rates(root: Path, domain: str, epochs: int, run_options: list[str], scratch: Path) -> list[float]:
    """Samples/s of each epoch after the first, of one ``pipelines.run DOMAIN fit`` from ``root``."""
    output = scratch / f"throughput-{time.time_ns()}.json"
    command = [
        sys.executable, "-m", "pipelines.run", domain, "fit", f"--trainer.max_epochs={epochs}", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--runs_dir", str(scratch / "runs"), *run_options,
        "--trainer.callbacks+=benchmarks.common.TrainingThroughput", f"--trainer.callbacks.output={output}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=root, env=child_env(root), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[2:])} in {root} exited with {done.returncode}: {done.stderr[-2000:]}")
    return [epoch["samples_per_s"] for epoch in json.loads(output.read_text())[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git revision to compare this working tree against")
    parser.add_argument("--domains", nargs="*", default=["finance", "autonomous"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run; the first is warm-up")
    args, run_options = parser.parse_known_args()
    run_options = [option for option in run_options if option != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        scratch, base_root = Path(tmp), Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_root), args.base], cwd=ROOT, check=True, capture_output=True)
        try:
            rates: dict[tuple[str, str], list[float]] = {}
            for domain in args.domains:
                for _ in range(args.repeats):
                    for side, root in (("base", base_root), ("head", ROOT)):
                        rates.setdefault((domain, side), []).extend(epoch_rates(root, domain, args.epochs, run_options, scratch))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_root)], cwd=ROOT, check=False, capture_output=True)
    results, rows = [], []
    for domain in args.domains:
        base, head = statistics.median(rates[domain, "base"]), statistics.median(rates[domain, "head"])
        results.append({"domain": domain, "base_samples_per_s": base, "head_samples_per_s": head, "head_over_base": head / base,
                        "base_epochs": rates[domain, "base"], "head_epochs": rates[domain, "head"]})  # fmt: skip
        rows.append([domain, f"{base:.0f}", f"{head:.0f}", f"{head / base:.3f}", len(rates[domain, "head"])])
    table = print_table(["domain", f"base ({args.base}) samples/s", "head samples/s", "head/base", "epochs each"], rows)
    write_results("compare_revisions", {"args": vars(args), "run_options": run_options, "results": results, "table": table, "date": time.strftime("%Y-%m-%d %H:%M")})


if __name__ == "__main__":
    main()
