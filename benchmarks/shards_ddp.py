"""Two DDP processes reading healthcare shards: what each rank read, samples/s and peak RSS per rank.

    python -m benchmarks.shards_ddp [--samples 2000] [--image_size 32] [--samples_per_shard 100] [--batch_size 32]
                                    [--workers 0] [--epochs 2]
                                    [--shards_multiple_of PROCESSES_X_WORKERS]

Writes a synthetic shard set (``python -m domains.healthcare.shards_write``'s code), then trains a linear classifier
(so that the loader, not a network, is measured) with a real 2-process DDP run (gloo on CPU, ``ddp_spawn``) over
``MedicalImageDataModule(shards=...)``. Each rank records the sample keys of every batch, its training time (wall and its
own CPU time) and its peak RSS. Checked, exit 1 if not: no shard is read by both ranks, both ranks draw the same number of
batches per epoch, and together they read every sample but the truncation the plan states. The same run is the slow test
``tests/test_shards_healthcare.py::test_two_process_ddp_ranks_read_disjoint_shards_and_draw_equal_batches``. A table goes to
stdout and JSON to ``benchmarks/results/shards_ddp.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

RESULTS = Path(__file__).resolve().parent / "results"


class KeyRecorder(pl.LightningModule):
    """A linear classifier that writes into ``out``, per rank and epoch, the keys (``index``) of every batch it was given,
    the training time (wall and this process's CPU) and this process's peak RSS."""

    def __init__(self, out: str, inputs: int, classes: int) -> None:
        super().__init__()
        self.out, self.layer = out, torch.nn.Linear(inputs, classes)
        self.seen: dict[str, list[list[int]]] = {"train": [], "val": []}

    def on_train_epoch_start(self) -> None:
        self.started = (time.perf_counter(), time.process_time())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen["train"].append(batch["index"].tolist())
        self.trained = (time.perf_counter(), time.process_time())
        return torch.nn.functional.cross_entropy(self.layer(batch["image"].flatten(1)), batch["label"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.seen["val"].append(batch["index"].tolist())

    def on_train_epoch_end(self) -> None:
        wall, cpu = (end - start for end, start in zip(self.trained, self.started))
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record = {**self.seen, "train_wall_s": wall, "train_cpu_s": cpu, "peak_rss_mib": peak_mib}
        (Path(self.out) / f"rank{self.global_rank}-epoch{self.current_epoch}.json").write_text(json.dumps(record))
        self.seen = {"train": [], "val": []}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run_ddp(shards: Path, out: Path, batch_size: int, workers: int, epochs: int) -> Any:
    """Train :class:`KeyRecorder` on ``shards`` with 2 CPU processes (gloo); returns the data module."""
    from domains.healthcare.data import MedicalImageDataModule

    module = MedicalImageDataModule(shards=str(shards), batch_size=batch_size, num_workers=workers, augment=None)
    shape = module.image_shape
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=epochs, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(KeyRecorder(str(out), int(torch.tensor(shape).prod()), module.num_classes), datamodule=module)
    return module


def shard_of_each_key(shards: Path, split: str) -> dict[int, str]:
    """Which shard file holds each sample key of ``split`` (read with webdataset)."""
    import webdataset as wds

    manifest = json.loads((shards / "manifest.json").read_text())
    return {int(s["__key__"]): e["file"] for e in manifest["splits"][split] for s in wds.tarfile_samples([{"url": str(shards / e["file"])}])}


def check_ranks(shards: Path, out: Path, batch_size: int, workers: int, epochs: int) -> dict[str, Any]:
    """What each rank read, checked (:class:`AssertionError` names the first failure); a summary per split and epoch."""
    from pipelines.shards import ShardPlan

    manifest = json.loads((shards / "manifest.json").read_text())
    summary: dict[str, Any] = {}
    for split in ("train", "val"):
        where = shard_of_each_key(shards, split)
        plan = ShardPlan.of([e["samples"] for e in manifest["splits"][split]], 2, workers, batch_size, split)
        for epoch in range(epochs):
            seen = [json.loads((out / f"rank{rank}-epoch{epoch}.json").read_text())[split] for rank in range(2)]
            assert len(seen[0]) == len(seen[1]) == sum(plan.batches[0]), f"{split} epoch {epoch}: batches per rank {[len(s) for s in seen]}"
            keys = [[k for batch in rank for k in batch] for rank in seen]
            files = [{where[k] for k in rank} for rank in keys]
            assert not files[0] & files[1], f"{split} epoch {epoch}: shards read by both ranks: {sorted(files[0] & files[1])}"
            assert len(set(keys[0]) | set(keys[1])) == len(keys[0]) + len(keys[1]) == len(where) - plan.skipped, f"{split} epoch {epoch}: keys"
            summary[f"{split}/{epoch}"] = {"batches_per_rank": len(seen[0]), "shards_per_rank": [len(f) for f in files], "samples": len(where),
                                           "skipped": plan.skipped, "order": keys}  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--samples_per_shard", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shards_multiple_of", type=int, default=None, help="the writer's option (default: 2 processes x max(1, workers))")
    args = parser.parse_args()
    multiple = args.shards_multiple_of or 2 * max(1, args.workers)
    from domains.healthcare.shards_write import write_shards

    with tempfile.TemporaryDirectory() as folder:
        shards, out = Path(folder) / "shards", Path(folder) / "ranks"
        out.mkdir()
        started = time.process_time()
        manifest = write_shards({"synthetic_samples": args.samples, "synthetic_image_size": args.image_size}, str(shards), args.samples_per_shard, multiple)
        write_cpu = time.process_time() - started
        run_ddp(shards, out, args.batch_size, args.workers, args.epochs)
        summary = check_ranks(shards, out, args.batch_size, args.workers, args.epochs)
        ranks = [[json.loads((out / f"rank{r}-epoch{e}.json").read_text()) for e in range(args.epochs)] for r in range(2)]
    train = manifest["splits"]["train"]
    val = summary["val/0"]
    print(f"shards: {sum(e['samples'] for e in train)} training samples in {len(train)} shards of at most {args.samples_per_shard} "
          f"(--shards_multiple_of {multiple}), {args.image_size}px; validation {val['samples']} samples, {val['skipped']} unread per epoch; "
          f"writer {write_cpu:.1f} s CPU (main process) for {args.samples} samples")  # fmt: skip
    print("| rank | epoch | train batches | samples/s (wall) | samples/s (rank CPU) | peak RSS MiB | shards read | skipped/epoch |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for rank, epochs in enumerate(ranks):
        for epoch, record in enumerate(epochs):
            samples = sum(len(b) for b in record["train"])
            row = {"rank": rank, "epoch": epoch, "batches": len(record["train"]), "samples_per_s_wall": samples / record["train_wall_s"],
                   "samples_per_cpu_s": samples / max(record["train_cpu_s"], 1e-9), "peak_rss_mib": record["peak_rss_mib"],
                   "shards": summary[f"train/{epoch}"]["shards_per_rank"][rank], "skipped": summary[f"train/{epoch}"]["skipped"]}  # fmt: skip
            rows.append(row)
            print(f"| {rank} | {epoch} | {row['batches']} | {row['samples_per_s_wall']:.0f} | {row['samples_per_cpu_s']:.0f} | {row['peak_rss_mib']:.0f} | "
                  f"{row['shards']} | {row['skipped']} |")  # fmt: skip
    print("checked: no shard read by both ranks; equal batches per rank; every sample read but the stated truncation")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shards_ddp.json").write_text(json.dumps({"args": vars(args), "write_cpu_s": write_cpu, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
