"""GAN vs diffusion at an equal training budget, through the product (``python -m pipelines.run media``).

``python -m benchmarks.media_mnist [--data mnist|breastmnist] [--budget-seconds 300] [--families gan,diffusion] [--seed 0]``

1. ``--data mnist``: ``../shared/data/media/mnist.npz`` (28x28 gray, 10 digits, official train/test);
   ``--data breastmnist``: ``../shared/data/healthcare/breastmnist.npz`` (MedMNIST v2 BreastMNIST,
   28x28 gray ultrasound, 2 classes, official train/val/test); or ``--npz`` any MNIST/MedMNIST-style file.
2. A first command, ``python -m pipelines.run media validate``, trains the data set's feature
   extractor once and stores it in the runs folder's cache (``runs/.feature_extractors``), with the
   reference statistics of the validation and test splits; every run below reuses that one file,
   so all FID/KID share one feature space (``fid_cnn``; not comparable with Inception FIDs).
3. Each family is then one ``python -m pipelines.run media`` command (fit, validation every
   ``--val-every`` epochs, the best checkpoint by ``val/fid_cnn``, then test), with
   ``--trainer.max_time`` = ``--budget-seconds`` (wall clock; validation counts against it) and one
   torch thread. The benchmark records the command's wall and CPU time (the child's user + system
   time), its steps and epochs (``summary.json``), the test metrics (every ``test/*`` key) and the
   validation FID per epoch (``metrics.jsonl``), and copies ``plots/test_samples.png``.
4. Prints a table and writes ``benchmarks/results/media_<data>.json`` and the grids.

The machine is shared: ``max_time`` is wall-clock, so on a loaded machine a family gets less CPU in
the same budget; the CPU seconds and the load average are in the report for that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = {
    "mnist": ROOT.parent / "shared" / "data" / "media" / "mnist.npz",
    "breastmnist": ROOT.parent / "shared" / "data" / "healthcare" / "breastmnist.npz",
}
RESULTS = ROOT / "benchmarks" / "results"

#: model options per family (28x28 gray images); the rest are the domain's defaults
FAMILIES = {
    "gan": {"class_path": "domains.media.model.GAN", "batch_size": 64, "init_args": {"latent_dim": 64, "width": 32}},
    "diffusion": {
        "class_path": "domains.media.model.Diffusion", "batch_size": 32,
        "init_args": {"unet_widths": [16, 32, 32], "attention_levels": [False, False, True], "norm_num_groups": 8, "lr": 0.002,
                      "prediction_type": "v_prediction", "snr_gamma": None},
    },
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.media_mnist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(DATA), default="mnist", help="which shared data set (default: mnist)")
    parser.add_argument("--npz", type=Path, default=None, help="an MNIST/MedMNIST-style .npz instead of --data")
    parser.add_argument("--budget-seconds", type=int, default=300, help="--trainer.max_time of each family (wall clock, validation included)")
    parser.add_argument("--families", default="gan,diffusion", help="comma-separated: gan, gan-diffaugment, diffusion, diffusion-guided")
    parser.add_argument("--train-images", type=int, default=20000, help="--data.max_train_images")
    parser.add_argument("--eval-images", type=int, default=500, help="--data.max_eval_images and --model.init_args.fid_samples")
    parser.add_argument("--val-every", type=int, default=1, help="--trainer.check_val_every_n_epoch")
    parser.add_argument("--extractor-steps", type=int, default=400, help="--model.init_args.extractor_steps (trained once per data set)")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="guidance scale of the diffusion-guided family (cond_drop_prob 0.1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the runs, the JSON and the grids")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def family_options(name: str, guidance_scale: float) -> dict:
    if name == "gan-diffaugment":
        base = FAMILIES["gan"]
        return {**base, "init_args": {**base["init_args"], "diffaugment": "color,translation,cutout"}}
    if name == "diffusion-guided":
        base = FAMILIES["diffusion"]
        return {**base, "init_args": {**base["init_args"], "cond_drop_prob": 0.1, "guidance_scale": guidance_scale}}
    if name not in FAMILIES:
        raise SystemExit(f"error: --families: unknown family {name!r}; known: gan, gan-diffaugment, diffusion, diffusion-guided")
    return FAMILIES[name]


def run_media(args: list[str], log: Path) -> dict:
    """``python -m pipelines.run media ARGS`` as a child process: exit status, wall and CPU seconds; output to ``log``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call([sys.executable, "-m", "pipelines.run", "media", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"})  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if code != 0:
        raise SystemExit(f"error: `python -m pipelines.run media {' '.join(args)}` exited {code}; see {log}")
    return {"wall_seconds": round(time.perf_counter() - started, 1), "cpu_seconds": round(cpu, 1)}


def read_run(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val_fid = [(row["epoch"], round(row["val/fid_cnn"], 2)) for row in rows if "val/fid_cnn" in row]
    test = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in (summary.get("test") or {}).items()}
    return {"global_step": summary.get("global_step"), "epochs": summary.get("epochs"), "test": test, "val_fid_cnn_by_epoch": val_fid}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    npz = args.npz or DATA[args.data]
    name = args.npz.stem if args.npz else args.data
    if not npz.is_file():
        print(f"error: {npz} is absent; the benchmark needs the shared data set there", file=sys.stderr)
        raise SystemExit(2)
    out = args.out
    runs_dir = out / f"runs-{name}"
    if runs_dir.exists():
        shutil.rmtree(runs_dir)  # this benchmark's own runs folder: fresh runs, and the extractor trained anew
    runs_dir.mkdir(parents=True)
    data = [f"--data.npz_path={npz}", "--data.image_size=28", f"--data.max_train_images={args.train_images}", f"--data.max_eval_images={args.eval_images}",
            f"--data.split_seed={args.seed}", f"--seed_everything={args.seed}", "--trainer.logger=false", "--runs_dir", str(runs_dir)]  # fmt: skip
    shared = [f"--model.init_args.extractor_steps={args.extractor_steps}", f"--model.init_args.fid_samples={args.eval_images}"]
    load_before = os.getloadavg()

    warmup = run_media(["validate", *data, "--model=domains.media.model.GAN", *shared, "--run_id", "extractor"], out / f"media_{name}_extractor.log")
    extractor = json.loads((runs_dir / "media" / "extractor" / "feature_extractor.json").read_text())
    extractor = {**json.loads(Path(extractor["source"]).with_suffix(".json").read_text()), **extractor}  # the cache's record has its accuracy
    print(f"[bench] {name}: feature extractor {extractor['sha256'][:16]} (val accuracy {extractor.get('val_accuracy', '?')}) in {warmup['wall_seconds']} s")

    results: dict = {}
    for family in args.families.split(","):
        options = family_options(family, args.guidance_scale)
        model = [f"--model={options['class_path']}", *shared, *[f"--model.init_args.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in options["init_args"].items()]]
        trainer = [f"--trainer.max_time=00:00:{args.budget_seconds // 60:02d}:{args.budget_seconds % 60:02d}", "--trainer.max_epochs=-1",
                   f"--trainer.check_val_every_n_epoch={args.val_every}"]  # fmt: skip
        load = os.getloadavg()[0]
        timing = run_media([*data, *model, *trainer, f"--data.batch_size={options['batch_size']}", "--run_id", family], out / f"media_{name}_{family}.log")
        run = runs_dir / "media" / family
        results[family] = {**timing, "load_average_1min_at_start": round(load, 2), "batch_size": options["batch_size"], **read_run(run)}
        grid = run / "plots" / "test_samples.png"
        if grid.is_file():
            shutil.copyfile(grid, out / f"media_{name}_{family}.png")
        print(f"[bench] {family}: {results[family]}")

    report = {
        "benchmark": f"media_{name}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": 1,
            "load_average_1_5_15min_at_start": [round(v, 2) for v in load_before], "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
        },  # fmt: skip
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "feature_extractor": {k: extractor.get(k) for k in ("sha256", "val_accuracy", "train_images", "steps", "task")},
        "results": results,
    }
    (out / f"media_{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return report


def print_table(report: dict) -> None:
    results = report["results"]
    keys = sorted({k for r in results.values() for k in r["test"] if not k.endswith("_std")})
    print(f"\n{report['benchmark']}: {report['settings']['budget_seconds']} s max_time each" + "".join(f" | {f:>18s}" for f in results))
    for label, value in [("wall s", lambda r: r["wall_seconds"]), ("CPU s", lambda r: r["cpu_seconds"]), ("steps", lambda r: r["global_step"]),
                         ("epochs", lambda r: r["epochs"])] + [(k, (lambda key: lambda r: r["test"].get(key))(k)) for k in keys]:  # fmt: skip
        print(f"{label:34s}" + "".join(f" | {value(r)!s:>18s}" for r in results.values()))


if __name__ == "__main__":
    main()
