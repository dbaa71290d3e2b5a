"""The GAN's EMA generator against its raw generator, from one checkpoint, on the run's own extractor and test split.

``python -m benchmarks.media_ema RUN_FOLDER [--checkpoint last.ckpt] [--split test]``

Loads ``RUN_FOLDER/checkpoints/<checkpoint>`` (weights only), rebuilds the run's data module from its
``config.yaml``, and scores the same seeded samples (seeds 10000..., the split's labels: what the run's
``test`` draws) of the EMA generator and of the raw generator with ``RUN_FOLDER/feature_extractor.safetensors``:
(EMA and raw weights, each with the batch-norm statistics from training and with statistics recomputed from
its own outputs), FID, KID, precision/recall and class accuracy (``domains.media.quality.offline_scores``). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml


def main(argv: list[str] | None = None) -> dict:
    from domains.media.data import MediaDataModule
    from domains.media.features import load_extractor
    from domains.media.metrics import features_of, reference_statistics
    from domains.media.model import GAN
    from domains.media.quality import offline_scores

    parser = argparse.ArgumentParser(prog="python -m benchmarks.media_ema", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a GAN run folder (runs/media/<id>)")
    parser.add_argument("--checkpoint", default="last.ckpt")
    parser.add_argument("--split", choices=("val", "test"), default="test")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    dm = MediaDataModule(**config["data"])
    dm.setup("test")
    path = args.run / "checkpoints" / args.checkpoint
    model = GAN.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    extractor = load_extractor(args.run / "feature_extractor.safetensors", model.hparams.in_channels).eval()
    images, labels = dm.split_tensors(args.split)
    count = min(len(labels), model.hparams.fid_samples)
    seeds, labels = list(range(10_000, 10_000 + count)), labels[:count]
    with torch.no_grad():
        reference = reference_statistics(features_of(extractor, images))
        results = {"checkpoint": str(path), "global_step": torch.load(path, map_location="cpu", weights_only=True)["global_step"], "split": args.split, "images": count}
        variants = {}
        # the EMA generator with the batch-norm statistics it carries in the checkpoint (the raw generator's), then
        # with its own (what it samples with), and the raw generator with its running statistics and with its own
        for name, weights, recompute in (("ema_raw_statistics", "ema", False), ("ema", "ema", True), ("raw", "raw", False), ("raw_own_statistics", "raw", True)):
            fresh = GAN.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
            if weights == "raw":
                fresh.ema_generator.load_state_dict(fresh.generator.state_dict())
            fresh._ema_statistics_fresh = not recompute
            variants[name] = fresh.generate(seeds, labels)
        for name, samples in variants.items():
            scores = offline_scores(extractor, args.split, reference, samples, labels, model.hparams.kid_subset_size, model.condition_classes)
            results[name] = {k.split("/")[1]: round(v, 4) for k, v in scores.items()}
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
