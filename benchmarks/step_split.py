"""Where the grouped path's cost per mini-batch goes: the plain loop, then each piece of
``--model.batches_per_step K`` (pipelines/grouped_steps.py) added to it, one at a time.

    python -m benchmarks.step_split [--domain finance] [--batch-size 256] [--batches-per-step 16] [--repeats 5] [--epochs 5] [--sides NAME ...] [--pieces]

In one process, alternating in every repeat, each side trains ``--epochs`` epochs (the first is
warm-up) and is timed over the training batches of every later epoch in **CPU time of this process**
(``time.process_time``), per mini-batch:

- ``plain``: the hand-written loop of :mod:`benchmarks.step_floor` (torch's AdamW, ``loss.backward()``).
- ``plain, task optimizer``: the same loop stepping the optimizer the task's ``configure_optimizers``
  builds (the runner's), to check it is the plain loop's optimizer, with the same torch threads.
- ``bare K, raw``: a bare ``Trainer`` (no logger, checkpoint, progress bar or summary; validation off)
  training groups of K mini-batches, each with the raw torch optimizer and ``loss.backward()``, the
  task's step with ``log_train_loss`` switched off: what Lightning's loop costs per mini-batch once
  it is paid per K.
- ``+ log_train_loss``, ``+ manual_backward`` (instead of ``loss.backward()``), ``+ LightningOptimizer``
  (``zero_grad``/``step`` through Lightning's wrapper instead of the raw optimizer), ``+ scheduler, finite
  check`` (the per-mini-batch scheduler loop and the CPU divergence check): each adds one piece to
  the previous side, so the differences between adjacent sides are what each piece costs.
- ``bare K``: the same bare ``Trainer`` with the task's own grouped step (what the product runs).
- ``runner K=1``: ``pipelines.run DOMAIN fit`` (one mini-batch per Lightning step, the default).
- ``runner K, no logger``: ``pipelines.run DOMAIN fit --model.batches_per_step K --trainer.logger false``
  (the runner's callbacks, no W&B logger and no learning-rate monitor), and ``runner K`` (the default
  fit: callbacks and the W&B logger, offline).

Before each side ``gc.collect()`` and ``gc.freeze()`` are called, so that the objects earlier sides
left behind (a runner leaves many) are not scanned again by the garbage collector of a later side.
Each side records the torch threads it trained with (``threads`` in the output).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.performance import TrainingCpuTime, build_defaults
from benchmarks.step_floor import plain_epochs, plain_ms, runner_ms
from pipelines.domain_registry import get_domain
from pipelines.grouped_steps import BatchGroup

PIECES = ("log_train_loss", "manual_backward", "lightning_optimizer", "scheduler_and_finite_check")


def ablated(task_class: type, pieces: tuple[str, ...]) -> type:
    """``task_class`` whose training step takes a group's optimizer steps with only ``pieces`` of the
    grouped path (the others replaced by the plain loop's calls)."""
    one_batch_step = task_class.training_step.__wrapped__  # the task's step before grouped_training_step

    def training_step(self: Any, group: BatchGroup, batch_idx: int) -> None:
        self.threads_seen = torch.get_num_threads()
        optimizer = self.optimizers()
        stepped = optimizer if "lightning_optimizer" in pieces else optimizer.optimizer
        configs = self.trainer.lr_scheduler_configs
        first = batch_idx * self.hparams.batches_per_step
        for offset, batch in enumerate(group):
            loss = one_batch_step(self, batch, first + offset)
            stepped.zero_grad()
            if "manual_backward" in pieces:
                self.manual_backward(loss)
            else:
                loss.backward()
            stepped.step()
            if "scheduler_and_finite_check" in pieces:
                for config in configs:
                    if config.interval == "step" and (first + offset + 1) % config.frequency == 0:
                        config.scheduler.step()
                if not math.isfinite(loss.item()):
                    return None
        return None

    members: dict[str, Any] = {"training_step": training_step}
    if "log_train_loss" not in pieces:
        members["log_train_loss"] = lambda self, loss, batch_size: None
    return type(f"{task_class.__name__}With{len(pieces)}Pieces", (task_class,), members)


class PieceTimes(pl.Callback):
    """CPU microseconds per call of each piece of the grouped path, timed inside the Trainer this callback runs in (its
    callbacks, profiler and strategy: a runner's or a bare one), at the first training batch of the second epoch:
    ``calls`` calls per piece in each of ``rounds`` rounds, the pieces alternating; the median round is kept. Written to
    ``output`` (JSON). Backward runs on a 3-weight graph outside the model and the optimizer steps with no gradients (it
    changes no weight), so what is timed is the call's own cost; ``log_train_loss`` is timed at a step it writes nothing
    at, and the task's running loss is put back afterwards."""

    def __init__(self, output: str, calls: int = 300, rounds: int = 7) -> None:
        self.output, self.calls, self.rounds, self.done = Path(output), calls, rounds, False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.done or trainer.current_epoch != 1:
            return
        self.done = True
        optimizer = pl_module.optimizers()
        raw = optimizer.optimizer
        weight = torch.nn.Parameter(torch.ones(3))
        loss = (weight * 2).sum().detach()
        running = {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in vars(pl_module).items() if name.startswith("_loss")}
        optimizer.zero_grad(set_to_none=True)
        pieces = {
            "loss.backward()": lambda: (weight * 2).sum().backward(),
            "manual_backward()": lambda: pl_module.manual_backward((weight * 2).sum()),
            "optimizer.step() raw": raw.step,
            "LightningOptimizer.step()": optimizer.step,
            "optimizer.zero_grad() raw": raw.zero_grad,
            "LightningOptimizer.zero_grad()": optimizer.zero_grad,
            "setattr of a str on the module": lambda: setattr(pl_module, "_timed_name", "x"),
        }
        every = trainer.log_every_n_steps
        if every <= 0 or (trainer.global_step + 1) % every:  # a step log_train_loss writes nothing at
            pieces["log_train_loss()"] = lambda: pl_module.log_train_loss(loss, 256)
        rounds: dict[str, list[float]] = {name: [] for name in pieces}
        for _ in range(self.rounds):
            for name, call in pieces.items():
                call()
                start = time.process_time()
                for _ in range(self.calls):
                    call()
                rounds[name].append(1e6 * (time.process_time() - start) / self.calls)
        for name, value in running.items():
            setattr(pl_module, name, value)
        self.output.write_text(json.dumps({name: statistics.median(values) for name, values in rounds.items()}))


def mini_batches_per_epoch(spec: Any, batch_size: int | None) -> int:
    _, dm = build_defaults(spec, batch_size)
    dm.setup("fit")
    return len(dm.train_dataloader())


def bare_grouped_ms(spec: Any, batch_size: int | None, epochs: int, seed: int, scratch: str, k: int, pieces: tuple[str, ...] | None,
                    *callbacks: pl.Callback) -> tuple[list[float], int]:
    """CPU ms per mini-batch of a bare Trainer training groups of ``k``; ``pieces`` None: the task's own grouped step."""
    pl.seed_everything(seed, verbose=False)
    model, dm = build_defaults(spec, batch_size)
    task_class = type(model) if pieces is None else ablated(type(model), pieces)
    model = task_class(**{**model.hparams, "batches_per_step": k})
    timer = TrainingCpuTime(f"{scratch}/bare-{time.time_ns()}.json")
    threads = ThreadsSeen()
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu", callbacks=[timer, threads, *callbacks], default_root_dir=scratch,
    )  # fmt: skip
    trainer.fit(model, dm)
    steps = mini_batches_per_epoch(spec, batch_size)
    return [1000 * seconds / steps for seconds in timer.epochs[1:]], threads.seen


class ThreadsSeen(pl.Callback):
    """The torch threads while the model trains (the task sets them in its ``setup``)."""

    seen = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = torch.get_num_threads()


def plain_task_optimizer_ms(spec: Any, batch_size: int | None, epochs: int, seed: int) -> tuple[list[float], int, str]:
    """The plain loop with the optimizer of the task's ``configure_optimizers`` (and its torch threads)."""
    pl.seed_everything(seed, verbose=False)
    model, dm = build_defaults(spec, batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(model.hparams.get("cpu_threads") or threads))
    dm.setup("fit")
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False)
    model.trainer = trainer  # configure_optimizers reads trainer.max_epochs for its schedule
    configured = model.configure_optimizers()
    model.trainer = None
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    described = f"{type(optimizer).__name__}({', '.join(f'{k}={v}' for k, v in sorted(optimizer.defaults.items()) if k in ('lr', 'weight_decay', 'foreach', 'fused', 'amsgrad', 'eps', 'betas', 'maximize', 'capturable', 'differentiable'))})"
    model.train()
    seen = torch.get_num_threads()
    measured = plain_epochs(model, dm, optimizer, epochs)
    torch.set_num_threads(threads)
    return measured, seen, described


def piece_times(domain: str, batch_size: int | None, k: int, repeats: int) -> None:
    """``--pieces``: :class:`PieceTimes` in a bare Trainer and in the runner (both training groups of ``k``), alternating."""
    spec = get_domain(domain)
    times: dict[str, list[dict[str, float]]] = {"bare": [], "runner": []}
    started, load = time.strftime("%H:%M:%S", time.gmtime()), os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(repeats):
            output = f"{scratch}/pieces-{time.time_ns()}.json"
            bare_grouped_ms(spec, batch_size, 2, seed, scratch, k, None, PieceTimes(output))
            times["bare"].append(json.loads(Path(output).read_text()))
            output = f"{scratch}/pieces-{time.time_ns()}.json"
            runner_ms(domain, batch_size, 2, scratch, k, "--trainer.callbacks+=benchmarks.step_split.PieceTimes", f"--trainer.callbacks.output={output}")
            times["runner"].append(json.loads(Path(output).read_text()))
    print(f"{domain}, K={k}: CPU us per call, median of {repeats} runs (each the median of 7 rounds of 300 calls), {started}-{time.strftime('%H:%M:%S', time.gmtime())} UTC, load {load[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    median = {side: {name: statistics.median(run[name] for run in runs) for name in runs[0]} for side, runs in times.items()}
    print(f"{'piece':34s} {'bare':>8s} {'runner':>8s}")
    for name in median["runner"]:
        print(f"{name:34s} {median['bare'].get(name, float('nan')):8.2f} {median['runner'][name]:8.2f}")
    for side, values in median.items():
        extra = {
            "manual_backward - loss.backward": values["manual_backward()"] - values["loss.backward()"],
            "LightningOptimizer.step - raw": values["LightningOptimizer.step()"] - values["optimizer.step() raw"],
            "LightningOptimizer.zero_grad - raw": values["LightningOptimizer.zero_grad()"] - values["optimizer.zero_grad() raw"],
        }
        extra["log_train_loss"] = values.get("log_train_loss()", float("nan"))
        print(f"{side}: per optimizer step over the plain loop's calls: " + ", ".join(f"{name} {value:.1f}" for name, value in extra.items()) + f"; sum {sum(extra.values()):.1f} us")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="finance")
    parser.add_argument("--batch-size", type=int, help="default: the domain's config.yaml")
    parser.add_argument("--batches-per-step", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5, help="per side and repeat; the first is warm-up")
    parser.add_argument("--sides", nargs="*", help="only these sides (names as printed, e.g. plain 'runner K=16'); default: all")
    parser.add_argument("--pieces", action="store_true", help="instead: CPU us per call of each piece, in a bare Trainer and in the runner (PieceTimes)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    warnings.simplefilter("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.pieces:
        return piece_times(args.domain, args.batch_size, args.batches_per_step, args.repeats)
    spec, k, b, epochs = get_domain(args.domain), args.batches_per_step, args.batch_size, args.epochs
    sides: dict[str, Any] = {"plain": lambda seed, scratch: (plain_ms(spec, b, epochs, seed), None)}
    sides["plain, task optimizer"] = lambda seed, scratch: plain_task_optimizer_ms(spec, b, epochs, seed)[:2]
    for count in range(len(PIECES) + 1):
        name = f"bare K={k}, raw" if count == 0 else f"  + {PIECES[count - 1]}"
        sides[name] = lambda seed, scratch, pieces=PIECES[:count]: bare_grouped_ms(spec, b, epochs, seed, scratch, k, pieces)
    sides[f"bare K={k}"] = lambda seed, scratch: bare_grouped_ms(spec, b, epochs, seed, scratch, k, None)
    sides["runner K=1"] = lambda seed, scratch: (runner_ms(args.domain, b, epochs, scratch), None)
    sides[f"runner K={k}, no logger"] = lambda seed, scratch: (runner_ms(args.domain, b, epochs, scratch, k, "--trainer.logger=false"), None)
    sides[f"runner K={k}"] = lambda seed, scratch: (runner_ms(args.domain, b, epochs, scratch, k), None)
    if args.sides:
        unknown = set(args.sides) - set(sides)
        if unknown:
            parser.error(f"unknown sides {sorted(unknown)}; the sides are {list(sides)}")
        sides = {name: run for name, run in sides.items() if name in args.sides or name == "plain"}
    print(f"optimizers: plain loop AdamW(lr, weight_decay from hparams); the task's: {plain_task_optimizer_ms(spec, b, 2, 0)[2]}")
    ms: dict[str, list[float]] = {side: [] for side in sides}
    threads: dict[str, set[int]] = {side: set() for side in sides}
    started, load = time.strftime("%H:%M:%S", time.gmtime()), os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.repeats):
            for side, run in sides.items():
                gc.collect()
                gc.freeze()
                values, seen = run(seed, scratch)
                ms[side] += values
                if seen:
                    threads[side].add(seen)
    print(f"{args.domain}, batch {b or 'default'}, K={k}: {args.repeats} repeats x {epochs - 1} measured epochs, {started}-{time.strftime('%H:%M:%S', time.gmtime())} UTC, load {load[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    median = {side: statistics.median(values) for side, values in ms.items()}
    previous = None
    for side, values in ms.items():
        step = f"{median[side] - median[previous]:+.3f}" if previous and (side.startswith("  +") or side == f"bare K={k}") else "      "
        seen = f" threads {sorted(threads[side])}" if threads[side] else ""
        print(f"{side:26s} CPU ms/mini-batch median {median[side]:.3f} (plain/side {median['plain'] / median[side]:.3f}) {step} q1-q3 {_quartiles(values)}{seen}")
        previous = side


def _quartiles(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.3f}-{q3:.3f}"


if __name__ == "__main__":
    main()
