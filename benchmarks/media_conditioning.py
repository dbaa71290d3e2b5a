"""Does the class-conditional diffusion model draw the class it is asked for? Class accuracy of samples by guidance scale.

``python -m benchmarks.media_conditioning [--data breastmnist|shapes] [--steps 1500] [--scales 0,1,3]``

Trains one diffusion model with classifier-free guidance (``cond_drop_prob``) in-process (a real Lightning
Trainer, no validation) for ``--steps`` optimizer steps, then draws one sample per test image, for that
image's label, at each guidance scale ``w`` (DDIM, ``--sample-steps``), and classifies the samples with the
data set's fixed feature extractor (the one ``pipelines.run media`` trains once per data set and caches).
It reports, per ``w``:

- ``class_acc``: the share of samples the extractor assigns to their requested class (what ``test/class_acc_cnn``
  logs). With imbalanced labels a model that ignores the label scores the share of the class the extractor
  prefers (BreastMNIST: 0.73 if that is the majority), so also
- ``balanced_acc``: the mean over classes of that share (chance 1 / classes, whatever the label balance), and
- ``predicted_share``: the share of samples the extractor puts in each class;
- ``fid``: FID (extractor features) against the test split.

The ceiling is the extractor's own accuracy on the real test images (``real_test``), also reported.
Writes ``benchmarks/results/media_conditioning_<data>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
BREASTMNIST = ROOT.parent / "shared" / "data" / "healthcare" / "breastmnist.npz"
RESULTS = ROOT / "benchmarks" / "results"
#: the diffusion family of ``benchmarks.media_mnist`` (28 px gray) and the domain's UNet for 32 px shapes
UNETS = {
    "breastmnist": {"unet_widths": [16, 32, 32], "attention_levels": [False, False, True], "norm_num_groups": 8},
    "shapes": {"unet_widths": [32, 64, 64], "attention_levels": [False, False, True], "norm_num_groups": 16},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.media_conditioning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(UNETS), default="breastmnist")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps of the diffusion model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cond-drop-prob", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--scales", default="0,1,3", help="guidance scales to sample at")
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per sample")
    parser.add_argument("--extractor-steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def class_scores(logits: torch.Tensor, labels: torch.Tensor, classes: int) -> dict:
    predicted = logits[:, :classes].argmax(1)
    hits = predicted == labels
    per_class = [float(hits[labels == c].float().mean()) for c in range(classes) if (labels == c).any()]
    return {
        "class_acc": round(float(hits.float().mean()), 4),
        "balanced_acc": round(sum(per_class) / len(per_class), 4),
        "predicted_share": [round(float((predicted == c).float().mean()), 4) for c in range(classes)],
    }


def main(argv: list[str] | None = None) -> dict:
    from domains.media.data import MediaDataModule
    from domains.media.metrics import features_of, fid, reference_statistics
    from domains.media.model import Diffusion

    args = parse_args(argv)
    torch.set_num_threads(1)
    pl.seed_everything(args.seed, verbose=False)
    if args.data == "breastmnist":
        dm = MediaDataModule(npz_path=str(BREASTMNIST), image_size=28, batch_size=args.batch_size)
    else:
        dm = MediaDataModule(synthetic_samples=1536, image_size=32, batch_size=args.batch_size)
    dm.setup("fit")
    linked = {"in_channels": dm.in_channels, "image_size": dm.image_size, "num_classes": dm.num_classes, "class_names": dm.class_names}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = Diffusion(**UNETS[args.data], prediction_type="v_prediction", snr_gamma=None, lr=args.lr, cond_drop_prob=args.cond_drop_prob,
                      extractor_steps=args.extractor_steps, extractor_cache=str(out / "extractors"), grid_samples=0, **linked)  # fmt: skip
    trainer = pl.Trainer(max_steps=args.steps, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out / f"conditioning-{args.data}")  # fmt: skip
    load_before, started = os.getloadavg(), time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_seconds = time.perf_counter() - started
    model.eval()
    classes = model.condition_classes
    images, labels = dm.split_tensors("test")
    with torch.no_grad():
        reference = reference_statistics(features_of(model.extractor, images))
        real = class_scores(model.extractor.logits(images), labels, classes)
        majority = float(torch.bincount(labels, minlength=classes).max()) / len(labels)
        by_scale = {}
        for scale in (float(s) for s in args.scales.split(",")):
            samples = model.generate(list(range(10_000, 10_000 + len(labels))), labels, steps=args.sample_steps, guidance_scale=scale)
            by_scale[str(scale)] = {**class_scores(model.extractor.logits(samples), labels, classes), "fid": round(fid(reference, features_of(model.extractor, samples)), 2)}
            print(f"[conditioning] w={scale}: {by_scale[str(scale)]}", flush=True)
    report = {
        "benchmark": f"media_conditioning_{args.data}", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_seconds": round(train_seconds, 1), "global_step": trainer.global_step,
        "load_average_1_5_15min": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]},
        "test_images": len(labels), "majority_share": round(majority, 4), "extractor_on_real_test": real, "samples_by_guidance_scale": by_scale,
    }  # fmt: skip
    (out / f"media_conditioning_{args.data}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
