"""BreastMNIST (MedMNIST v2, 28 px, official splits) through `pipelines.run healthcare`.

    python -m benchmarks.healthcare_breastmnist [--epochs 100] [--network resnet18] [--width 0.5] [--batch-size 128] [--lr 1e-3] [--weight-decay 1e-4] [--image-size 28] [--augment config|flips|none] [--seed 42]
        [--stem small|standard] [--lr-schedule cosine|step|constant] [--balance none|class_weights|sampler]

The defaults (half-width ResNet-18 with the small-image stem, 100 epochs, cosine schedule, the
domain config's augmentation, no class weights, about 5 min on 2 cores) were picked on validation
AUROC among the seeded configurations in benchmarks/RESULTS.md.

Trains with the project's runner (model picked on validation AUROC, as MedMNIST does), tests the
best checkpoint and prints test AUC and ACC beside MedMNIST v2's ResNet-18 (28) row (AUC 0.901,
ACC 0.863), with training throughput (samples/s, data loading included) and peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.common import RESULTS, SHARED_DATA, TrainingThroughput, peak_rss_mib, print_table, require, write_results

PUBLISHED = {"auc": 0.901, "acc": 0.863}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--network", default="resnet18")
    parser.add_argument("--width", type=float, default=0.5, help="ResNet channel multiplier (--model.width)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--image-size", type=int, default=28, help="resize the 28 px images (--data.image_size: MONAI Resize) before the network")
    parser.add_argument("--balance", default="none", choices=["class_weights", "sampler", "none"])
    parser.add_argument("--augment", default="config", choices=["config", "flips", "none"], help="the domain config's albumentations, flips only, or none")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--stem", default="small", choices=["small", "standard"], help="ResNet stem: 3x3 stride 1 (small images) or 7x7 stride 2 + max-pool")
    parser.add_argument("--lr-schedule", default="cosine", choices=["cosine", "step", "constant"])
    args = parser.parse_args()
    npz = require(SHARED_DATA / "healthcare" / "breastmnist.npz")
    runs = RESULTS / "runs"
    throughput = RESULTS / "healthcare_breastmnist_throughput.json"

    from pipelines.run import main as run

    started = time.perf_counter()
    run_id = f"breastmnist-{time.strftime('%Y%m%d-%H%M%S')}"
    augment = {"config": [], "none": ["--data.augment=[]"], "flips": ["--data.augment=[{HorizontalFlip: {p: 0.5}}, {VerticalFlip: {p: 0.5}}]"]}[args.augment]
    run([
        "healthcare", f"--seed_everything={args.seed}", "--data.npz_path", str(npz), f"--data.batch_size={args.batch_size}",
        f"--data.balance={args.balance}", f"--data.image_size={args.image_size}", f"--model.network={args.network}", f"--model.width={args.width}", f"--model.lr={args.lr}", f"--model.weight_decay={args.weight_decay}",
        f"--model.small_input_stem={args.stem == 'small'}", f"--model.lr_schedule={args.lr_schedule}",
        f"--trainer.max_epochs={args.epochs}", "--runs_dir", str(runs), "--run_id", run_id,
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=benchmarks.common.TrainingThroughput", f"--trainer.callbacks.output={throughput}", *augment,
    ])  # fmt: skip
    wall = time.perf_counter() - started
    summary = json.loads((runs / "healthcare" / run_id / "summary.json").read_text())
    epochs = json.loads(throughput.read_text())
    rate = statistics.median(e["samples_per_s"] for e in epochs)
    test = summary["test"]
    rows = [
        ["MedMNIST v2 ResNet-18 (28), published", "-", PUBLISHED["auc"], PUBLISHED["acc"], "-", "-", "-"],
        [f"pipelines.run healthcare ({args.network} x{args.width:g}, {args.stem} stem, {args.image_size} px, {args.epochs} ep, {args.lr_schedule} lr {args.lr:g}, batch {args.batch_size}, wd {args.weight_decay:g}, augment {args.augment}, balance {args.balance}, seed {args.seed})", summary["best_score"], test["test/auroc"], test["test/accuracy"], rate, peak_rss_mib(), wall / 60],
    ]
    table = print_table(["model", "val AUC (selection)", "test AUC", "test ACC", "train samples/s (median epoch)", "peak RSS MiB", "wall min"], rows)
    write_results("healthcare_breastmnist", {"args": vars(args), "summary": summary, "epochs": epochs, "wall_s": wall, "peak_rss_mib": peak_rss_mib(), "table": table})


if __name__ == "__main__":
    main()
