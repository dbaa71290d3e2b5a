"""Does the pipeline cost anything over a hand-written PyTorch loop? Is the data loader fast enough?

    python -m benchmarks.performance [--domains healthcare finance] [--repeats 3] [--epochs 2] [--skip-default-run] [--skip-startup] [--batch-size N]

For each domain's default model and data (its ``config.yaml``), in one process:

- training samples/s through ``pipelines.run DOMAIN fit`` (W&B offline logging, checkpoints and all;
  the window is the training batches of an epoch, validation excluded) against a plain loop over the
  same model, data module, batch size, optimiser and thread count (``training_step``, ``backward``,
  ``AdamW.step``); medians over repeats, first epoch of each repeat dropped as warm-up;
- the data loader alone (samples/s out of ``train_dataloader()`` with the configured transforms and
  workers) against the model's compute alone (steps on batches already in memory); the loader
  should be >= 3x faster than the model consumes;
- the same ratio in CPU time of this process (``time.process_time``), which other jobs on a shared
  machine disturb far less than wall time;
- the runner's cost per training step in milliseconds (pipeline minus plain step time), beside the
  plain step time: a fixed per-step cost shows as a ratio below 1 only for steps of a few ms;
- start-up: ``--help`` wall time (from the help cache, and uncached beside ``import lightning.pytorch``
  alone, the floor of any uncached call) and time to the first training step (new processes), and
  which heavy packages a domain's classes import;
- peak resident memory and wall time of a default run (``python -m pipelines.run DOMAIN``).

On a GPU the same command also reports GPU samples/s, the share of time waiting for data and peak
GPU memory of the pipeline run. There the plain loop is written as a GPU user would write it, with the
runner's defaults: autocast to the precision the runner picks (bf16 where supported), channels-last
weights for models that ask for them, pinned memory and non-blocking copies. ``--batch-size`` replaces
every domain's configured batch size (the defaults are sized for a 2-core CPU). Prints a table;
writes ``benchmarks/results/performance.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from benchmarks.common import ROOT, batch_size_of, child_env, print_table, write_results
from pipelines.domain_registry import DomainSpec, import_dotted, available_domains, get_domain
from pipelines.hardware import plan_hardware

class FirstStepTimer(pl.Callback):
    """Write the wall-clock time of the first training batch to a file (time to first step)."""

    def __init__(self, output: str) -> None:
        self.output = Path(output)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0 and not self.output.exists():
            self.output.write_text(str(time.time()))


class TrainingCpuTime(pl.Callback):
    """Write this process's CPU seconds per training epoch (from its start to its last batch) to a JSON file.

    Beside wall time: on a shared machine other jobs stretch wall time by whatever they take, and CPU
    time much less, so the pipeline/plain ratio in CPU time is the one to trust under load.
    """

    def __init__(self, output: str) -> None:
        self.output, self.epochs = Path(output), []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last = time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append(self._last - self._start)
        self.output.write_text(json.dumps(self.epochs))


def build_defaults(spec: DomainSpec, batch_size: int | None = None) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The domain's default model and data module, from its config.yaml, with linked values."""
    config = yaml.safe_load(spec.config.read_text())
    data_config = {**config.get("data", {}), **({"batch_size": batch_size} if batch_size else {})}
    datamodule = spec.load_datamodule_class()(**data_config)
    model_config = dict(config.get("model", {}))
    if spec.model_subclasses:
        cls, kwargs = import_dotted(model_config["class_path"]), dict(model_config.get("init_args", {}))
    else:
        cls, kwargs = spec.load_model_class(), model_config
    kwargs.update({target: getattr(datamodule, source) for source, target in spec.links})
    return cls(**kwargs), datamodule


def _device_batch(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _device_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_device_batch(v, device) for v in batch)
    return batch


@functools.lru_cache
def _mixed_precision(device_type: str) -> torch.dtype | None:
    """The autocast dtype of the precision the runner's hardware plan picks for this device (None: 32-bit)."""
    precision = plan_hardware({"accelerator": "gpu" if device_type == "cuda" else "cpu"}, environ={}).settings["precision"]
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def _step(model: pl.LightningModule, optimizer: torch.optim.Optimizer, batch: Any, index: int, device: torch.device) -> None:
    dtype = _mixed_precision(device.type)
    with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        out = model.training_step(batch, index)
    loss = out["loss"] if isinstance(out, dict) else out
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def plain_epoch(model: pl.LightningModule, datamodule: pl.LightningDataModule, optimizer, device) -> dict[str, float]:
    """One hand-written training epoch; returns samples/s and the share of time spent waiting for data."""
    model.train()
    samples, waiting = 0, 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    iterator = iter(datamodule.train_dataloader())
    index = 0
    while True:
        t = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        waiting += time.perf_counter() - t
        batch = datamodule.on_after_batch_transfer(_device_batch(batch, device), 0)
        _step(model, optimizer, batch, index, device)
        samples += batch_size_of(batch)
        index += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"samples_per_s": samples / seconds, "data_wait_share": waiting / seconds, "cpu_samples_per_s": samples / (time.process_time() - cpu_start)}


def loader_and_compute_rates(model, datamodule, optimizer, device) -> dict[str, float]:
    start, samples, batches = time.perf_counter(), 0, []
    for batch in datamodule.train_dataloader():
        samples += batch_size_of(batch)
        batches.append(batch)
    loader_rate = samples / (time.perf_counter() - start)
    model.train()
    start = time.perf_counter()
    for index, batch in enumerate(batches):
        _step(model, optimizer, datamodule.on_after_batch_transfer(_device_batch(batch, device), 0), index, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    compute_rate = samples / (time.perf_counter() - start)
    return {"loader_samples_per_s": loader_rate, "compute_samples_per_s": compute_rate, "loader_over_compute": loader_rate / compute_rate}


def pipeline_epochs(domain: str, epochs: int, runs_dir: Path, batch_size: int | None, extra: tuple[str, ...] = ()) -> list[dict[str, float]]:
    """``pipelines.run DOMAIN fit`` in this process; per epoch: samples/s and the share of time between steps."""
    from pipelines.run import main as run

    output, cpu_output = runs_dir / f"throughput-{time.time_ns()}.json", runs_dir / f"cpu-{time.time_ns()}.json"
    run([
        domain, "fit", f"--trainer.max_epochs={epochs}", "--runs_dir", str(runs_dir), "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", *([f"--data.batch_size={batch_size}"] if batch_size else []), *extra,
        "--trainer.callbacks+=benchmarks.common.TrainingThroughput", f"--trainer.callbacks.output={output}",
        "--trainer.callbacks+=benchmarks.performance.TrainingCpuTime", f"--trainer.callbacks.output={cpu_output}",
    ])  # fmt: skip
    epochs = json.loads(output.read_text())
    return [{**epoch, "cpu_samples_per_s": epoch["samples"] / cpu} for epoch, cpu in zip(epochs, json.loads(cpu_output.read_text()))]


def _wall(command: list[str], env: dict[str, str] | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env or child_env(), capture_output=True, check=True)
    return time.perf_counter() - t


def startup(domain: str, runs_dir: Path, repeats: int) -> dict[str, Any]:
    help_command = [sys.executable, "-m", "pipelines.run", domain, "--help"]
    uncached = statistics.median(_wall(help_command, {**child_env(), "PIPELINES_NO_HELP_CACHE": "1"}) for _ in range(repeats))
    helps = [_wall(help_command) for _ in range(repeats)]  # the first fills the cache if the code changed
    import_floor = statistics.median(_wall([sys.executable, "-c", "import lightning.pytorch"]) for _ in range(repeats))
    marker = runs_dir / f"first-step-{domain}.txt"
    launched = time.time()
    subprocess.run(
        [sys.executable, "-m", "pipelines.run", domain, "fit", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
         "--trainer.limit_val_batches=0", "--runs_dir", str(runs_dir),
         "--trainer.callbacks+=benchmarks.performance.FirstStepTimer", f"--trainer.callbacks.output={marker}"],
        cwd=ROOT, env=child_env(), capture_output=True, check=True,
    )  # fmt: skip
    spec = get_domain(domain)
    code = (
        "import sys; from pipelines.domain_registry import get_domain; s = get_domain(%r); s.load_model_class(); s.load_datamodule_class(); "
        "print(sorted(m for m in ('monai', 'transformers', 'albumentations') if m in sys.modules))" % spec.name
    )
    heavy = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True, check=True).stdout.strip()
    return {
        "help_s": statistics.median(helps), "help_uncached_s": uncached, "import_lightning_s": import_floor,
        "first_step_s": float(marker.read_text()) - launched, "imports": heavy,
    }  # fmt: skip


#: Runs a command and prints its peak RSS in KiB. Linux keeps the pre-exec peak of a forked process
#: in ``ru_maxrss``, so a run forked straight from this (large) benchmark process would report at
#: least this process's size; this small intermediary is what gets forked instead.
_PEAK_RSS_OF = "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"


def default_run(domain: str, runs_dir: Path) -> dict[str, float]:
    """Wall time and peak resident memory of ``python -m pipelines.run DOMAIN`` (fit + test)."""
    command = [sys.executable, "-m", "pipelines.run", domain, "--runs_dir", str(runs_dir), "--trainer.enable_progress_bar=false"]
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS_OF, *command], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"python -m pipelines.run {domain} exited with {done.returncode}: {done.stderr[-2000:]}")
    return {"default_run_s": time.perf_counter() - t, "peak_rss_mib": int(done.stdout.split()[-1]) / 1024}


def measure(
    domain: str, repeats: int, epochs: int, skip_default_run: bool, batch_size: int | None = None, skip_startup: bool = False, batches_per_step: int | None = None,
) -> dict[str, Any]:
    spec = get_domain(domain)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"domain": domain, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(tmp)
        plain, plain_cpu, piped, waits, gpu_peaks = [], [], [], [], []
        default_threads = torch.get_num_threads()

        def run_pipeline() -> list[dict[str, float]]:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            extra = (f"--model.batches_per_step={batches_per_step}",) if batches_per_step else ()
            measured = pipeline_epochs(domain, epochs, runs_dir, batch_size, extra)[1:]  # the first epoch warms up
            if device.type == "cuda":
                gpu_peaks.append(torch.cuda.max_memory_allocated() / 2**20)
            return measured

        for repeat in range(repeats):
            pl.seed_everything(repeat, verbose=False)
            model, datamodule = build_defaults(spec, batch_size)
            if not model.automatic_optimization:
                result["plain"] = "n/a: the model optimises manually (a plain loop would be the same code)"
                piped += run_pipeline()
                continue
            # the same intra-op thread count as the runner uses for this model (BaseTask's cpu_threads)
            torch.set_num_threads(int(model.hparams.get("cpu_threads") or default_threads))
            result["threads"] = torch.get_num_threads()
            datamodule.setup("fit")
            model.to(device)
            if device.type == "cuda" and model.hparams.get("channels_last"):
                model.to(memory_format=torch.channels_last)
            optimizer = torch.optim.AdamW(model.parameters(), lr=float(model.hparams.get("lr", 1e-3)), weight_decay=float(model.hparams.get("weight_decay", 0.0)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # self.log() without a Trainer is a no-op
                epochs_plain = [plain_epoch(model, datamodule, optimizer, device) for _ in range(epochs)][1:]
                if repeat == 0:
                    result.update(loader_and_compute_rates(model, datamodule, optimizer, device))
            plain += [e["samples_per_s"] for e in epochs_plain]
            plain_cpu += [e["cpu_samples_per_s"] for e in epochs_plain]
            waits += [e["data_wait_share"] for e in epochs_plain]
            torch.set_num_threads(default_threads)
            del model, optimizer
            piped += run_pipeline()
        result.update(
            pipeline_samples_per_s=statistics.median(e["samples_per_s"] for e in piped),
            pipeline_between_steps_share=statistics.median(e["between_steps_share"] for e in piped),
            repeats=repeats, batch_size=int(datamodule.hparams.batch_size),
        )  # fmt: skip
        if gpu_peaks:
            result["gpu_peak_memory_mib"] = max(gpu_peaks)
        if plain:
            batch = float(datamodule.hparams.batch_size)
            result.update(
                plain_samples_per_s=statistics.median(plain),
                pipeline_over_plain=result["pipeline_samples_per_s"] / statistics.median(plain),
                overhead_ms_per_step=1000 * batch * (1 / result["pipeline_samples_per_s"] - 1 / statistics.median(plain)),
                plain_ms_per_step=1000 * batch / statistics.median(plain),
                data_wait_share=statistics.median(waits),
                cpu_pipeline_over_plain=statistics.median(e["cpu_samples_per_s"] for e in piped) / statistics.median(plain_cpu),
            )
        if not skip_startup:
            result.update(startup(domain, runs_dir, repeats))
        if not skip_default_run:
            result.update(default_run(domain, runs_dir))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="*", default=available_domains())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per repeat; the first is warm-up")
    parser.add_argument("--skip-default-run", action="store_true")
    parser.add_argument("--skip-startup", action="store_true", help="no --help, first-step or import measurements")
    parser.add_argument("--batch-size", type=int, help="replaces each domain's configured batch size (e.g. GPU-sized batches)")
    parser.add_argument("--batches-per-step", type=int, help="the runner's --model.batches_per_step (finance, autonomous; pipelines/grouped_steps.py)")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    results = [measure(d, args.repeats, args.epochs, args.skip_default_run, args.batch_size, args.skip_startup, args.batches_per_step) for d in args.domains]

    def cell(r: dict, key: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else "-"

    rows = [
        [
            r["domain"], r["device"], r["batch_size"], cell(r, "pipeline_samples_per_s"), cell(r, "plain_samples_per_s"), cell(r, "pipeline_over_plain", "{:.3f}"),
            cell(r, "cpu_pipeline_over_plain", "{:.3f}"), cell(r, "plain_ms_per_step", "{:.2f}"), cell(r, "overhead_ms_per_step", "{:.2f}"),
            cell(r, "loader_samples_per_s", "{:.0f}"), cell(r, "compute_samples_per_s"), cell(r, "loader_over_compute", "{:.1f}"),
            cell(r, "data_wait_share", "{:.1%}"), cell(r, "pipeline_between_steps_share", "{:.1%}"), cell(r, "gpu_peak_memory_mib", "{:.0f}"), cell(r, "help_s", "{:.2f}"), cell(r, "help_uncached_s", "{:.1f}"),
            cell(r, "import_lightning_s", "{:.1f}"), cell(r, "first_step_s", "{:.1f}"), r.get("imports", "-"),
            cell(r, "peak_rss_mib", "{:.0f}"), cell(r, "default_run_s", "{:.0f}"),
        ]
        for r in results
    ]
    headers = [
        "domain", "device", "batch", "pipeline samples/s", "plain samples/s", "ratio", "ratio (CPU time)", "plain ms/step", "overhead ms/step",
        "loader samples/s", "compute samples/s", "loader/compute", "data wait (plain)", "between steps (pipeline)", "GPU peak MiB", "--help s", "--help uncached s",
        "import lightning s", "first step s", "heavy imports", "peak RSS MiB", "default run s",
    ]  # fmt: skip
    table = print_table(headers, rows)
    write_results("performance", {"args": vars(args), "results": results, "table": table, "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
