"""How much of the runner's per-step cost is Lightning's own loop, and how much is ours?

    python -m benchmarks.step_floor [--domain finance] [--batch-size 256] [--repeats 2] [--epochs 3] [--batches-per-step 1 4 8 16]

In one process, alternating in every repeat: the plain loop of :mod:`benchmarks.performance`, a bare
``Trainer`` (no logger, no checkpointing, no progress bar or summary, validation off) and the runner
(``pipelines.run DOMAIN fit``), each timed over the training batches of every epoch after the first
in **CPU time of this process** (``time.process_time``: other jobs on a shared machine disturb it far
less than wall time). Prints CPU ms per step of each and the differences: bare - plain is
Lightning's floor, runner - bare is ours. ``--batches-per-step`` runs the runner once per value of
``--model.batches_per_step`` in every repeat (pipelines/grouped_steps.py: K mini-batches per Lightning
step); its ms are per mini-batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch

from benchmarks.performance import TrainingCpuTime, build_defaults
from pipelines.domain_registry import get_domain


def plain_ms(spec, batch_size: int | None, epochs: int, seed: int) -> list[float]:
    pl.seed_everything(seed, verbose=False)
    model, dm = build_defaults(spec, batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(model.hparams.get("cpu_threads") or threads))
    dm.setup("fit")
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(model.hparams.get("lr", 1e-3)), weight_decay=float(model.hparams.get("weight_decay", 0.0)))
    model.train()
    measured = plain_epochs(model, dm, optimizer, epochs)
    torch.set_num_threads(threads)
    return measured


def plain_epochs(model, dm, optimizer, epochs: int) -> list[float]:
    """The plain loop: CPU ms per step of each epoch after the first (``time.process_time``)."""
    measured = []
    for epoch in range(epochs):
        start, steps = time.process_time(), 0
        for index, batch in enumerate(dm.train_dataloader()):
            loss = model.training_step(dm.on_after_batch_transfer(batch, 0), index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        if epoch:
            measured.append(1000 * (time.process_time() - start) / steps)
    return measured


def bare_ms(spec, batch_size: int | None, epochs: int, seed: int, scratch: str) -> list[float]:
    pl.seed_everything(seed, verbose=False)
    model, dm = build_defaults(spec, batch_size)
    timer = TrainingCpuTime(f"{scratch}/bare-{time.time_ns()}.json")
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu", callbacks=[timer], default_root_dir=scratch,
    )  # fmt: skip
    trainer.fit(model, dm)
    return [1000 * seconds / trainer.num_training_batches for seconds in timer.epochs[1:]]


def runner_ms(domain: str, batch_size: int | None, epochs: int, scratch: str, batches_per_step: int | None = None, *options: str) -> list[float]:
    from pipelines.run import main as run

    output = f"{scratch}/runner-{time.time_ns()}.json"
    run([
        domain, "fit", f"--trainer.max_epochs={epochs}", "--runs_dir", scratch, "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0", *([f"--data.batch_size={batch_size}"] if batch_size else []),
        *([f"--model.batches_per_step={batches_per_step}"] if batches_per_step else []),
        "--trainer.callbacks+=benchmarks.performance.TrainingCpuTime", f"--trainer.callbacks.output={output}", *options,
    ])  # fmt: skip
    _, dm = build_defaults(get_domain(domain), batch_size)
    dm.setup("fit")
    steps = len(dm.train_dataloader())
    return [1000 * seconds / steps for seconds in json.loads(open(output).read())[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="finance")
    parser.add_argument("--batch-size", type=int, help="default: the domain's config.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    parser.add_argument("--batches-per-step", type=int, nargs="*", default=[], help="runner runs with these --model.batches_per_step values")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    warnings.simplefilter("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    spec = get_domain(args.domain)
    ms: dict[str, list[float]] = {"plain": [], "bare": [], "runner": [], **{f"runner K={k}": [] for k in args.batches_per_step}}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.repeats):
            ms["plain"] += plain_ms(spec, args.batch_size, args.epochs, seed)
            ms["bare"] += bare_ms(spec, args.batch_size, args.epochs, seed, scratch)
            ms["runner"] += runner_ms(args.domain, args.batch_size, args.epochs, scratch)
            for k in args.batches_per_step:
                ms[f"runner K={k}"] += runner_ms(args.domain, args.batch_size, args.epochs, scratch, k)
    median = {side: statistics.median(values) for side, values in ms.items()}
    for side, values in ms.items():
        print(f"{side:12s} CPU ms/step median {median[side]:.3f} min {min(values):.3f}  epochs: {' '.join(f'{v:.2f}' for v in values)}")
    print(f"Lightning's floor (bare - plain): {median['bare'] - median['plain']:+.3f} ms/step, plain/bare {median['plain'] / median['bare']:.3f}")
    print(f"the runner's own (runner - bare): {median['runner'] - median['bare']:+.3f} ms/step, plain/runner {median['plain'] / median['runner']:.3f}")
    for k in args.batches_per_step:
        side = f"runner K={k}"
        print(f"{side}: {median[side] - median['plain']:+.3f} ms/step over plain, plain/runner {median['plain'] / median[side]:.3f}")


if __name__ == "__main__":
    main()
