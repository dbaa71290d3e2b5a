"""GAN vs diffusion on MNIST at an equal wall-clock training budget, on this machine's CPU.

``python -m benchmarks.media_mnist [--budget-seconds 300] [--eval-images 500] [--ddpm-images 100] [--threads 1]``

1. Reads ``../shared/data/media/mnist.npz`` (28x28 gray, 10 classes) through the media data module.
2. Trains the offline feature extractor once (a small classifier of the digits) and uses that one
   file for every FID/KID below, so all numbers share a feature space (``fid_cnn``); they are not
   comparable with Inception FIDs from the literature.
3. Trains the GAN and the diffusion model (both class-conditional) for the same wall-clock budget
   each (Lightning ``max_time``; no validation during training), measuring training samples/s.
   The GAN uses the domain's defaults (widened for digits); the diffusion model a small UNet for
   28x28, the cosine schedule and velocity prediction (``--prediction-type``; the domain's default
   is ``epsilon``) in batches of 32 (more, smaller
   steps converge faster within minutes than batches of 64 at the same images/s).
4. Generates ``--eval-images`` images from each (diffusion: DDIM with 50 steps, EMA weights) and
   computes FID/KID against as many held-out test images; then, for the DDIM-vs-DDPM question,
   generates ``--ddpm-images`` images from the same seeds with DDPM (1000 steps) and DDIM-50 and
   compares FID/KID and images/s. DDPM is slow on a CPU (~0.6 images/s here), hence the smaller
   sample there: FID on a hundred images is biased upwards and noisy (KID is unbiased), so read
   that row with care. Each class-conditional sample is also classified by the extractor
   ("requested digit recognised").
5. Prints the table, writes ``benchmarks/results/media_mnist.json`` and the sample grids (about
   15 minutes in all with the defaults and one thread).

Every number is measured here; the targets of issue 5 are printed next to the verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "media" / "mnist.npz"
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.media_mnist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--npz", type=Path, default=MNIST, help="MNIST-style .npz (default: ../shared/data/media/mnist.npz)")
    parser.add_argument("--budget-seconds", type=float, default=300.0, help="training wall-clock budget per model")
    parser.add_argument("--train-images", type=int, default=20000, help="training images used (of 60000)")
    parser.add_argument("--eval-images", type=int, default=500, help="generated and real images for the main FID/KID")
    parser.add_argument("--ddpm-images", type=int, default=100, help="images for the DDPM-1000 vs DDIM-50 comparison")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--gan-batch-size", type=int, default=64)
    parser.add_argument("--diffusion-batch-size", type=int, default=32)
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="v_prediction", help="what the diffusion UNet predicts")
    parser.add_argument("--schedule", default="cosine", help="diffusion noise schedule (MONAI name)")
    parser.add_argument("--snr-gamma", type=float, default=None, help="min-SNR loss weighting of the diffusion model (default: none)")
    parser.add_argument("--extractor-steps", type=int, default=400, help="training batches of the feature extractor")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and the grids")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); 1 is far faster on a loaded machine")
    return parser.parse_args(argv)


class TrainingClock:
    """Lightning callback: wall time and images seen between the first and the last training batch."""

    def __new__(cls):  # built lazily so that `--help` does not import Lightning
        import lightning.pytorch as pl

        class _Clock(pl.Callback):
            def __init__(self) -> None:
                self.images, self.start, self.seconds = 0, None, 0.0

            def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
                if self.start is None:
                    self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                self.images += len(batch["image"])
                self.seconds = time.perf_counter() - self.start

        return _Clock()


def fid_kid(extractor: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[float, float]:
    """FID and KID (seeded subsets of up to 100) of ``fake`` against ``real`` in the extractor's features."""
    from domains.media.metrics import features_of, fid, kid, reference_statistics

    reference = reference_statistics(features_of(extractor, real))
    features = features_of(extractor, fake)
    return fid(reference, features), kid(reference, features, subset_size=100)[0]


def timed_generation(model, seeds: list[int], labels: torch.Tensor, **kwargs) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    images = model.generate(seeds, labels, **kwargs)
    return images, len(seeds) / (time.perf_counter() - start)


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
    from pipelines.plots import image_grid

    figure = image_grid(images[:40], [str(int(v)) for v in labels[:40]], columns=10)
    figure.savefig(path, dpi=90, bbox_inches="tight")  # a figure of its own (pipelines.plots.new_figure): nothing to close


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.npz.is_file():
        print(f"error: {args.npz} is absent; the benchmark needs the MNIST copy in ../shared/data/media/", file=sys.stderr)
        raise SystemExit(2)
    import lightning.pytorch as pl

    from domains.media.data import MediaDataModule
    from domains.media.features import accuracy, save_extractor, train_feature_cnn
    from domains.media.model import GAN, Diffusion

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    batch_sizes = {"gan": args.gan_batch_size, "diffusion": args.diffusion_batch_size}

    def data(batch_size: int) -> MediaDataModule:
        module = MediaDataModule(npz_path=str(args.npz), image_size=28, max_train_images=args.train_images,
                                 max_eval_images=max(args.eval_images, args.ddpm_images), batch_size=batch_size, split_seed=args.seed)  # fmt: skip
        module.setup()
        return module

    dm = data(args.gan_batch_size)  # the extractor's data and the real images of every FID/KID
    linked = {"in_channels": dm.in_channels, "image_size": dm.image_size, "num_classes": dm.num_classes, "class_names": dm.class_names}
    print(f"[bench] MNIST: {len(dm.split_indices['train'])} training images, {dm.num_classes} classes, {dm.in_channels}x28x28; torch threads {torch.get_num_threads()}")

    started = time.perf_counter()
    train_x, train_y = dm.split_tensors("train", 10000)
    extractor = train_feature_cnn(train_x, train_y, steps=args.extractor_steps, width=16, seed=args.seed)
    test_x, test_y = dm.split_tensors("test")
    extractor_accuracy = accuracy(extractor, test_x, test_y)
    extractor_path = save_extractor(extractor, args.out / "media_mnist_extractor" / "feature_extractor.safetensors", {"task": "classes", "test_accuracy": round(extractor_accuracy, 4)})
    print(f"[bench] feature extractor: digit accuracy {extractor_accuracy:.3f} on test images, trained in {time.perf_counter() - started:.0f}s")

    families = {
        "gan": (GAN, {"latent_dim": 64, "width": 32}),
        "diffusion": (Diffusion, {
            "unet_widths": [16, 32, 32], "attention_levels": [False, False, True], "norm_num_groups": 8, "num_res_blocks": 1, "lr": 2e-3,
            "ema_decay": 0.999, "schedule": args.schedule, "prediction_type": args.prediction_type, "snr_gamma": args.snr_gamma,
        }),  # fmt: skip
    }
    real = test_x[: args.eval_images]
    labels = test_y[: args.eval_images]
    seeds = list(range(100_000, 100_000 + args.eval_images))
    results: dict = {}
    models = {}
    for name, (cls, hparams) in families.items():
        pl.seed_everything(args.seed, verbose=False)
        model = cls(**hparams, **linked, feature_extractor_weights=str(extractor_path))
        clock = TrainingClock()
        trainer = pl.Trainer(
            max_time={"seconds": args.budget_seconds}, max_epochs=-1, limit_val_batches=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[clock], default_root_dir=str(args.out / "lightning"),
        )  # fmt: skip
        trainer.fit(model, datamodule=data(batch_sizes[name]))
        model.eval()
        kwargs = {"steps": args.ddim_steps, "sampler": "ddim"} if name == "diffusion" else {}
        fake, speed = timed_generation(model, seeds, labels, **kwargs)
        fid, kid = fid_kid(extractor, real, fake)
        with torch.no_grad():
            class_accuracy = float((extractor.logits(fake)[:, : extractor.task_outputs].argmax(1) == labels).float().mean())
        save_grid(fake, labels, args.out / f"media_mnist_{name}.png")
        results[name] = {
            "train_seconds": round(clock.seconds, 1),
            "train_steps": trainer.global_step,
            "train_images": clock.images,
            "train_samples_per_s": round(clock.images / max(clock.seconds, 1e-9), 1),
            f"fid_cnn@{args.eval_images}": round(fid, 3),
            f"kid_cnn@{args.eval_images}": round(kid, 5),
            "class_accuracy_cnn": round(class_accuracy, 3),
            "generation_images_per_s": round(speed, 2),
            "sampler": f"DDIM-{args.ddim_steps} (EMA weights)" if name == "diffusion" else "one generator pass",
        }
        models[name] = model
        print(f"[bench] {name}: {results[name]}")

    diffusion = models["diffusion"]
    small_seeds, small_labels, small_real = seeds[: args.ddpm_images], labels[: args.ddpm_images], test_x[: args.ddpm_images]
    comparison = {}
    for sampler, steps in (("ddim", args.ddim_steps), ("ddpm", diffusion.hparams.num_train_timesteps)):
        fake, speed = timed_generation(diffusion, small_seeds, small_labels, steps=steps, sampler=sampler)
        fid, kid = fid_kid(extractor, small_real, fake)
        key = f"{sampler.upper()}-{steps}"
        comparison[key] = {f"fid_cnn@{args.ddpm_images}": round(fid, 3), f"kid_cnn@{args.ddpm_images}": round(kid, 5), "images_per_s": round(speed, 3)}
        save_grid(fake, small_labels, args.out / f"media_mnist_diffusion_{sampler}{steps}.png")
        print(f"[bench] diffusion {key}: {comparison[key]}")
    results["diffusion_samplers"] = comparison

    ddim, ddpm = comparison[f"DDIM-{args.ddim_steps}"], comparison[f"DDPM-{diffusion.hparams.num_train_timesteps}"]
    fid_key = f"fid_cnn@{args.eval_images}"
    small_key = f"fid_cnn@{args.ddpm_images}"
    verdicts = {
        "diffusion_beats_gan_on_fid": results["diffusion"][fid_key] < results["gan"][fid_key],
        "ddim_fid_within_10pct_of_ddpm": ddim[small_key] <= 1.10 * ddpm[small_key],
        "ddim_speedup_over_ddpm": round(ddim["images_per_s"] / max(ddpm["images_per_s"], 1e-9), 1),
    }
    report = {
        "benchmark": "media_mnist",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15min_at_start": [round(v, 2) for v in load_before], "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__,
        },  # fmt: skip
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "feature_extractor": {"file": str(extractor_path.relative_to(ROOT)) if extractor_path.is_relative_to(ROOT) else str(extractor_path), "digit_test_accuracy": round(extractor_accuracy, 4)},
        "results": results,
        "verdicts": verdicts,
        "targets": {"diffusion_beats_gan_on_fid": True, "ddim_fid_within_10pct_of_ddpm": True, "ddim_speedup_over_ddpm": 20},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "media_mnist.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report, args)
    return report


def print_table(report: dict, args: argparse.Namespace) -> None:
    gan, diffusion = report["results"]["gan"], report["results"]["diffusion"]
    fid_key, kid_key = f"fid_cnn@{args.eval_images}", f"kid_cnn@{args.eval_images}"
    rows = [
        ("training budget (s)", args.budget_seconds, args.budget_seconds),
        ("batch size", args.gan_batch_size, args.diffusion_batch_size),
        ("optimizer steps", gan["train_steps"], diffusion["train_steps"]),
        ("training samples/s", gan["train_samples_per_s"], diffusion["train_samples_per_s"]),
        (f"FID (cnn, {args.eval_images} images)", gan[fid_key], diffusion[fid_key]),
        (f"KID (cnn, {args.eval_images} images)", gan[kid_key], diffusion[kid_key]),
        ("requested digit recognised", gan["class_accuracy_cnn"], diffusion["class_accuracy_cnn"]),
        ("generation images/s", gan["generation_images_per_s"], diffusion["generation_images_per_s"]),
    ]
    print(f"\n{'MNIST, equal budget':34s} {'GAN':>14s} {'diffusion (DDIM-' + str(args.ddim_steps) + ')':>24s}")
    for label, a, b in rows:
        print(f"{label:34s} {a!s:>14s} {b!s:>24s}")
    print(f"\n{'diffusion sampler (' + str(args.ddpm_images) + ' images)':34s} {'FID (cnn)':>12s} {'KID (cnn)':>12s} {'images/s':>10s}")
    for key, row in report["results"]["diffusion_samplers"].items():
        values = list(row.values())
        print(f"{key:34s} {values[0]!s:>12s} {values[1]!s:>12s} {values[2]!s:>10s}")
    verdicts = report["verdicts"]
    print(
        f"\ntarget: diffusion FID < GAN FID at equal budget -> {'met' if verdicts['diffusion_beats_gan_on_fid'] else 'NOT met'}"
        f"\ntarget: DDIM-{args.ddim_steps} FID within 10 % of DDPM -> {'met' if verdicts['ddim_fid_within_10pct_of_ddpm'] else 'NOT met'}"
        f"\ntarget: DDIM ~20x faster than DDPM -> measured {verdicts['ddim_speedup_over_ddpm']}x"
        f"\nresults: {args.out / 'media_mnist.json'}"
    )


if __name__ == "__main__":
    main()
