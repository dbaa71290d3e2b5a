"""ETH/UCY leave-one-scene-out benchmark of the autonomous domain.

``python -m benchmarks.autonomous_ethucy [--epochs 6] [--scenes eth hotel ...] [--single rnn] [--multi mixture]``

For each of the five scenes it trains, through the project's own runner (``pipelines.run``'s
``PipelineCLI`` with ``domains/autonomous/configs/eth_ucy.yaml``), on the other four scenes'
training files, picks the checkpoint on their validation files (``val/score``) and tests on the
held-out scene, exactly the Social-GAN protocol (observe 8 frames = 3.2 s, predict 12 = 4.8 s,
every pedestrian window of 20 frames, metres). Two models per scene:

- ``--single`` (default ``rnn``: the LSTM encoder-decoder): one prediction, ADE/FDE, beside the
  Social-GAN paper's LSTM row;
- ``--multi`` (default ``mixture``; ``cvae`` also works): best of 20 futures (min ADE/FDE), beside
  Social-STGCNN's best-of-20 row.

The constant-velocity extrapolation of the last observed step is printed as a reference. Prints a
table and writes ``benchmarks/results/autonomous_ethucy.json`` (metrics, training time, training
windows per second (training epochs only, validation excluded), versions, the exact command-line options of every run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "domains" / "autonomous" / "configs" / "eth_ucy.yaml"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "autonomous" / "eth_ucy"
RESULTS = ROOT / "benchmarks" / "results"
SCENES = ("eth", "hotel", "univ", "zara1", "zara2")

# Published rows, from ../shared/data/README.md (ADE/FDE in metres).
PUBLISHED = {
    "Social GAN paper, LSTM (single prediction)": {
        "eth": (1.09, 2.41), "hotel": (0.86, 1.91), "univ": (0.61, 1.31), "zara1": (0.41, 0.88), "zara2": (0.52, 1.11), "avg": (0.70, 1.52)},
    "Social-STGCNN (best of 20)": {
        "eth": (0.64, 1.11), "hotel": (0.49, 0.85), "univ": (0.44, 0.79), "zara1": (0.34, 0.53), "zara2": (0.30, 0.48), "avg": (0.44, 0.75)},
}  # fmt: skip
LSTM_ROW, STGCNN_ROW = PUBLISHED


class FitClock(pl.Callback):
    """Seconds spent in training epochs (validation excluded) and in the whole ``fit``."""

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.fit_seconds = 0.0
        self._started: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def _stop(self) -> None:
        if self._started is not None:
            self.train_seconds += time.perf_counter() - self._started
            self._started = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stop()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_started


def constant_velocity(root: Path, scene: str) -> tuple[float, float, int]:
    """ADE/FDE of extrapolating the last observed step, on the test windows of ``scene``."""
    import torch

    from domains.autonomous.data import SensorSequenceDataModule

    dm = SensorSequenceDataModule(eth_ucy_root=str(root), eth_ucy_scene=scene, channels=[], target_channels=["x", "y"])
    dm.setup()
    test = dm.datasets["test"].tensors
    step = test["past"][:, -1] - test["past"][:, -2]
    pred = test["past"][:, -1:] + step[:, None] * torch.arange(1, test["future"].shape[1] + 1)[None, :, None]
    distance = (pred - test["future"]).norm(dim=-1)
    return float(distance.mean()), float(distance[:, -1].mean()), len(test["past"])


def train_and_test(root: Path, scene: str, architecture: str, epochs: int, batch_size: int, runs_dir: Path, extra: list[str]) -> dict[str, Any]:
    """One leave-one-scene-out run through the runner; returns test metrics and timings."""
    from pipelines.cli import PipelineCLI
    from pipelines.domain_registry import get_domain

    args = [
        "fit", "--config", str(CONFIG), f"--data.eth_ucy_root={root}", f"--data.eth_ucy_scene={scene}",
        f"--model.architecture={architecture}", f"--trainer.max_epochs={epochs}", f"--data.batch_size={batch_size}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=benchmarks.autonomous_ethucy.FitClock", "--runs_dir", str(runs_dir), *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Lightning's per-run tables; stdout keeps the summary table
        cli = PipelineCLI(get_domain("autonomous"), args, test_after_fit=True)
    wall = time.perf_counter() - started
    clock = next(c for c in cli.trainer.callbacks if type(c).__name__ == "FitClock")
    train_seconds = clock.train_seconds
    windows = {name: len(ds) for name, ds in cli.datamodule.datasets.items()}
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    summary = json.loads((cli.run.path / "summary.json").read_text())
    return {
        "architecture": architecture,
        "metrics": metrics,
        "best_val_score": summary.get("best_score"),
        "epochs": epochs,
        "train_seconds": train_seconds,
        "fit_seconds": clock.fit_seconds,
        "wall_seconds": wall,
        "windows": windows,
        "train_samples_per_second": windows["train"] * epochs / max(train_seconds, 1e-9),
        "args": args[1:],
    }


def _pair(ade: float | None, fde: float | None) -> str:
    return "-" if ade is None else f"{ade:.2f}/{fde:.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_DATA, help="ETH/UCY folder (<scene>/{train,val,test}/*.txt)")
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=SCENES)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs per run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--single", default="rnn", choices=["rnn", "transformer", "none"], help="single-prediction model")
    parser.add_argument("--multi", default="mixture", choices=["mixture", "cvae", "none"], help="best-of-20 model")
    parser.add_argument("--output", type=Path, default=RESULTS / "autonomous_ethucy.json")
    parser.add_argument("extra", nargs="*", help="further runner options for every run, e.g. --model.hidden_size=128 (after --)")
    options = parser.parse_args(argv)
    if not options.root.is_dir():
        parser.error(f"{options.root} not found: the ETH/UCY copy lives in ../shared/data/autonomous/eth_ucy beside the project")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    models = [m for m in (options.single, options.multi) if m != "none"]
    results: dict[str, Any] = {"scenes": {}}
    total_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ethucy-runs-") as runs:
        for scene in options.scenes:
            cv_ade, cv_fde, n_test = constant_velocity(options.root, scene)
            entry: dict[str, Any] = {"test_windows": n_test, "constant_velocity": {"ade": cv_ade, "fde": cv_fde}}
            for architecture in models:
                run = train_and_test(options.root, scene, architecture, options.epochs, options.batch_size, Path(runs), options.extra)
                entry[architecture] = run
                m = run["metrics"]
                best = f", best of 20 {_pair(m.get('test/min_ade'), m.get('test/min_fde'))}" if "test/min_ade" in m else ""
                print(f"[benchmark] {scene} {architecture}: ADE/FDE {_pair(m['test/ade'], m['test/fde'])}{best}, "
                      f"train {run['train_seconds']:.0f} s, {run['train_samples_per_second']:.0f} windows/s", file=sys.stderr)  # fmt: skip
            results["scenes"][scene] = entry
    total = time.perf_counter() - total_started

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    rows = []
    header = f"{'scene':<7} {'CV':>10} {'single':>10} {'SGAN LSTM':>10} {'best-of-20':>11} {'STGCNN':>10} {'train s':>8} {'win/s':>7}"
    averages: dict[str, list[float]] = {k: [] for k in ("cv_ade", "cv_fde", "ade", "fde", "min_ade", "min_fde")}
    for scene, entry in results["scenes"].items():
        single = entry.get(options.single, {}).get("metrics", {})
        multi = entry.get(options.multi, {}).get("metrics", {})
        cv = entry["constant_velocity"]
        for key, value in (("cv_ade", cv["ade"]), ("cv_fde", cv["fde"]), ("ade", single.get("test/ade")), ("fde", single.get("test/fde")),
                           ("min_ade", multi.get("test/min_ade")), ("min_fde", multi.get("test/min_fde"))):  # fmt: skip
            if value is not None:
                averages[key].append(value)
        seconds = sum(entry[m]["train_seconds"] for m in models)
        speed = mean([entry[m]["train_samples_per_second"] for m in models])
        rows.append(
            f"{scene:<7} {_pair(cv['ade'], cv['fde']):>10} {_pair(single.get('test/ade'), single.get('test/fde')):>10} "
            f"{_pair(*PUBLISHED[LSTM_ROW][scene]):>10} {_pair(multi.get('test/min_ade'), multi.get('test/min_fde')):>11} "
            f"{_pair(*PUBLISHED[STGCNN_ROW][scene]):>10} {seconds:>8.0f} {speed or 0:>7.0f}"
        )
    avg = {k: mean(v) for k, v in averages.items()}
    complete = len(options.scenes) == len(SCENES)
    rows.append(
        f"{'avg' if complete else 'avg*':<7} {_pair(avg['cv_ade'], avg['cv_fde']):>10} {_pair(avg['ade'], avg['fde']):>10} "
        f"{_pair(*PUBLISHED[LSTM_ROW]['avg']):>10} {_pair(avg['min_ade'], avg['min_fde']):>11} {_pair(*PUBLISHED[STGCNN_ROW]['avg']):>10}"
    )
    print(f"ETH/UCY leave-one-scene-out, ADE/FDE in metres (observe 8, predict 12); single = {options.single}, "
          f"best-of-20 = {options.multi}; {options.epochs} epochs per run, total {total / 60:.1f} min")  # fmt: skip
    print(header)
    print("\n".join(rows))
    if not complete:
        print("* average over the scenes run only; the published averages cover all five")

    import torch

    results.update(
        {
            "protocol": "ETH/UCY leave-one-scene-out, Social-GAN layout; observe 8, predict 12; ADE/FDE in metres; best of 20 for the multi model",
            "single_model": options.single,
            "multi_model": options.multi,
            "average": avg,
            "published": {name: {k: list(v) for k, v in rows_.items()} for name, rows_ in PUBLISHED.items()},
            "epochs": options.epochs,
            "batch_size": options.batch_size,
            "extra_options": options.extra,
            "total_seconds": total,
            "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": 1},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {options.output}")
    return results


if __name__ == "__main__":
    main()
