"""The GAN's EMA generator against its raw generator, from one checkpoint, on the run's own extractor and test split.

``python -m benchmarks.media_ema RUN_FOLDER [--checkpoint last.ckpt] [--split test]``

Loads ``RUN_FOLDER/checkpoints/<checkpoint>`` (weights only), rebuilds the run's data module from its
``config.yaml``, and scores the same seeded samples (seeds 10000..., the split's labels: what the run's
``test`` draws) of the EMA generator and of the raw generator with ``RUN_FOLDER/feature_extractor.safetensors``:
FID, KID, precision/recall and class accuracy (``domains.media.quality.offline_scores``). Prints one JSON line.
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
        ema = model.generate(seeds, labels)
        model.ema_generator.load_state_dict(model.generator.state_dict())  # the raw generator, sampled the same way
        raw = model.generate(seeds, labels)
        for name, samples in (("ema", ema), ("raw", raw)):
            scores = offline_scores(extractor, args.split, reference, samples, labels, model.hparams.kid_subset_size, model.condition_classes)
            results[name] = {k.split("/")[1]: round(v, 4) for k, v in scores.items()}
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
