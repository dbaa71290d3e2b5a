"""CPU seconds per GAN training batch for each ``classifier_hue_turn``, side by side in one process.

The media default's networks (generator width 32, discriminator width 16, reflect padding, latent 128) on the
32x32 shapes set, batches of 32, one torch thread, a real Trainer: ``time.process_time`` around each training
batch (forward, backward and both Adam steps), after warm-up batches; modes alternate over repeats so that a
change of machine load falls on all of them alike.

    python -m benchmarks.media_batch_cost [--batches 10] [--warmup 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch

from domains.media.data import MediaDataModule
from domains.media.gan import CLASSIFIER_HUE_TURNS
from domains.media.model import GAN

DEFAULT_NETWORKS = {"latent_dim": 128, "width": 16, "generator_width": 32, "generator_padding": "reflect", "extractor_steps": 2}


class BatchClock(pl.Callback):
    """CPU seconds of each training batch after the first ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.seconds, self._start = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.seconds.append(time.process_time() - self._start)


def seconds_per_batch(mode: str, batches: int, warmup: int) -> list[float]:
    pl.seed_everything(0, verbose=False)
    dm = MediaDataModule(synthetic_samples=512, image_size=32, batch_size=32)
    dm.setup("fit")
    clock = BatchClock(warmup)
    with tempfile.TemporaryDirectory() as root:
        model = GAN(**DEFAULT_NETWORKS, classifier_hue_turn=mode, in_channels=dm.in_channels, image_size=dm.image_size, num_classes=dm.num_classes,
                    class_names=dm.class_names, extractor_cache=f"{root}/extractors")  # fmt: skip
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=warmup + batches, limit_val_batches=0, callbacks=[clock], default_root_dir=root,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(model, datamodule=dm)
    return clock.seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, list[float]] = {mode: [] for mode in CLASSIFIER_HUE_TURNS}
    for _ in range(args.repeats):
        for mode in CLASSIFIER_HUE_TURNS:
            results[mode].append(statistics.mean(seconds_per_batch(mode, args.batches, args.warmup)))
    base = statistics.mean(results["off"])
    for mode, means in results.items():
        print(f"{mode:>20}: {' / '.join(f'{m:.3f}' for m in means)} CPU s per batch (repeats), {statistics.mean(means) / base:.2f}x off")


if __name__ == "__main__":
    main()
