"""Two DDP processes reading a domain's shards: what each rank read, samples/s and peak RSS per rank.

    python -m benchmarks.shards_ddp [--domain healthcare|finance|autonomous] [--samples N] [--image_size 32]
                                    [--samples_per_shard N] [--batch_size N] [--workers 0] [--epochs 2]
                                    [--shards_multiple_of PROCESSES_X_WORKERS] [--one_process]

Writes a synthetic shard set with the domain's writer (``python -m domains.<domain>.shards_write``'s code; ``--samples``:
healthcare images, finance synthetic transactions, autonomous simulated vehicles), then trains a linear layer (so that the
loader, not a network, is measured: healthcare classifies the image, finance reconstructs the encoded features, autonomous
maps the observed positions to the future ones) with a real 2-process DDP run (gloo on CPU, ``ddp_spawn``) over the data
module with ``shards=...``. Each rank records the sample keys of every batch (healthcare ``index``, finance ``row``,
autonomous ``index``), its training time (wall and its own CPU time) and its peak RSS (``VmHWM``, :func:`peak_rss_mib`).
Checked, exit 1 if not: no shard is read by both ranks, both ranks draw the same number of batches per epoch, and
together they read every sample but the truncation the plan states. The same run is the slow test
``tests/test_shards_healthcare.py::test_two_process_ddp_ranks_read_disjoint_shards_and_draw_equal_batches``. A table goes
to stdout and JSON to ``benchmarks/results/shards_ddp[-<domain>].json``.

``--one_process``: no DDP run; the shards and the in-memory path of the same source are read side by side (setup, two
training epochs, two validation passes), each in a fresh interpreter: CPU time per sample and peak RSS of each.
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


def peak_rss_mib() -> float:
    """This process's peak resident set (``VmHWM``). Not ``ru_maxrss``: Linux carries that across ``execve``, so a spawned
    DDP rank or reader started it at its parent's resident set (the parent that wrote the shards, its source in memory)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: per domain: the batch field that names a sample, and the linear layer's input and target fields
FIELDS = {"healthcare": ("index", "image", "label"), "finance": ("row", "numeric", "numeric"), "autonomous": ("index", "past", "future")}


class KeyRecorder(pl.LightningModule):
    """A linear layer that writes into ``out``, per rank and epoch, the keys (``FIELDS``) of every batch it was given, the
    training time (wall and this process's CPU) and this process's peak RSS."""

    def __init__(self, out: str, inputs: int, outputs: int, domain: str = "healthcare") -> None:
        super().__init__()
        self.out, self.layer, self.domain = out, torch.nn.Linear(inputs, outputs), domain
        self.key, self.input, self.target = FIELDS[domain]
        self.seen: dict[str, list[list[int]]] = {"train": [], "val": []}

    def on_train_epoch_start(self) -> None:
        self.started = (time.perf_counter(), time.process_time())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen["train"].append(batch[self.key].tolist())
        self.trained = (time.perf_counter(), time.process_time())
        predicted = self.layer(batch[self.input].flatten(1).float())
        if self.domain == "healthcare":
            return torch.nn.functional.cross_entropy(predicted, batch[self.target])
        return torch.nn.functional.mse_loss(predicted, batch[self.target].flatten(1).float())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.seen["val"].append(batch[self.key].tolist())

    def on_train_epoch_end(self) -> None:
        wall, cpu = (end - start for end, start in zip(self.trained, self.started))
        peak_mib = peak_rss_mib()
        record = {**self.seen, "train_wall_s": wall, "train_cpu_s": cpu, "peak_rss_mib": peak_mib}
        (Path(self.out) / f"rank{self.global_rank}-epoch{self.current_epoch}.json").write_text(json.dumps(record))
        self.seen = {"train": [], "val": []}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def data_module(domain: str, shards: Path, batch_size: int, workers: int) -> tuple[Any, int, int]:
    """The domain's data module over ``shards``, and the linear layer's input and output sizes."""
    if domain == "healthcare":
        from domains.healthcare.data import MedicalImageDataModule

        module = MedicalImageDataModule(shards=str(shards), batch_size=batch_size, num_workers=workers, augment=None)
        return module, int(torch.tensor(module.image_shape).prod()), module.num_classes
    if domain == "finance":
        from domains.finance.data import TransactionDataModule

        module = TransactionDataModule(shards=str(shards), batch_size=batch_size, num_workers=workers)
        return module, module.num_numeric, module.num_numeric
    from domains.autonomous.data import SensorSequenceDataModule

    module = SensorSequenceDataModule(shards=str(shards), batch_size=batch_size, num_workers=workers)
    return module, module.observe * module.target_dim, module.predict * module.target_dim


def run_ddp(shards: Path, out: Path, batch_size: int, workers: int, epochs: int, domain: str = "healthcare") -> Any:
    """Train :class:`KeyRecorder` on ``shards`` with 2 CPU processes (gloo); returns the data module."""
    module, inputs, outputs = data_module(domain, shards, batch_size, workers)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=epochs, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(KeyRecorder(str(out), inputs, outputs, domain), datamodule=module)
    return module


def shard_of_each_key(shards: Path, split: str, domain: str = "healthcare") -> dict[int, str]:
    """Which shard file holds each sample key of ``split`` (read with webdataset; a row shard's keys from its blocks)."""
    import webdataset as wds

    from pipelines.row_shards import decode_block

    manifest = json.loads((shards / "manifest.json").read_text())
    where = {}
    for entry in manifest["splits"][split]:
        for sample in wds.tarfile_samples([{"url": str(shards / entry["file"])}]):
            keys = [int(sample["__key__"])] if domain == "healthcare" else decode_block(sample)[FIELDS[domain][0]].tolist()
            where.update(dict.fromkeys(keys, entry["file"]))
    return where


def check_ranks(shards: Path, out: Path, batch_size: int, workers: int, epochs: int, domain: str = "healthcare") -> dict[str, Any]:
    """What each rank read, checked (:class:`AssertionError` names the first failure); a summary per split and epoch."""
    from pipelines.shards import ShardPlan

    manifest = json.loads((shards / "manifest.json").read_text())
    summary: dict[str, Any] = {}
    for split in ("train", "val"):
        where = shard_of_each_key(shards, split, domain)
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


#: per domain: --samples, --samples_per_shard and --batch_size when not given (the domain's default batch size)
DEFAULTS = {"healthcare": (2000, 100, 32), "finance": (200_000, 8192, 256), "autonomous": (2000, 2048, 64)}


def write_set(domain: str, samples: int, image_size: int, shards: Path, samples_per_shard: int, multiple: int) -> dict[str, Any]:
    """A synthetic shard set of ``samples`` (images, transactions or simulated vehicles) with the domain's writer."""
    if domain == "healthcare":
        from domains.healthcare.shards_write import write_shards

        return write_shards({"synthetic_samples": samples, "synthetic_image_size": image_size}, str(shards), samples_per_shard, multiple)
    from pipelines.row_shards import config_defaults

    if domain == "finance":
        from domains.finance import SPEC
        from domains.finance.shards_write import write_shards as write_rows

        return write_rows({**config_defaults(SPEC.config), "synthetic_rows": samples}, str(shards), samples_per_shard, multiple)
    from domains.autonomous import SPEC as AUTONOMOUS
    from domains.autonomous.shards_write import write_shards as write_windows

    return write_windows({**config_defaults(AUTONOMOUS.config), "sim_vehicles": samples}, str(shards), samples_per_shard, multiple)


def read_rates(domain: str, source: dict[str, Any], shards: str | None, batch_size: int, out: str) -> None:
    """In this process (a fresh interpreter: ``--one_process``): the data module from ``shards``, or else from the source
    options ``source`` in memory; CPU seconds for its setup, two training epochs and two validation passes, and the peak
    RSS; JSON into ``out``."""
    import importlib

    from pipelines.domain_registry import import_dotted

    spec = importlib.import_module(f"domains.{domain}").SPEC
    module_class = import_dotted(spec.datamodule_class)
    started = time.process_time()
    module = module_class(shards=shards, batch_size=batch_size) if shards else module_class(**{**source, "batch_size": batch_size})
    module.setup("fit")
    record: dict[str, Any] = {"path": "shards" if shards else "memory", "setup_cpu_s": time.process_time() - started}
    for split in ("train", "val"):
        for epoch in range(2):
            loader = module.train_dataloader() if split == "train" else module.val_dataloader()
            started, samples = time.process_time(), 0
            for batch in loader:
                samples += len(batch[FIELDS[domain][0]])
            record[f"{split}{epoch}"] = {"samples": samples, "cpu_s": time.process_time() - started}
    record["peak_rss_mib"] = peak_rss_mib()
    Path(out).write_text(json.dumps(record))


def one_process(domain: str, samples: int, image_size: int, shards: Path, batch_size: int) -> None:
    """``--one_process``: the shards and the in-memory path of the same source read side by side, each in a fresh
    interpreter (so that each peak RSS is its own); a table to stdout."""
    import multiprocessing

    from pipelines.row_shards import config_defaults

    source = {"synthetic_samples": samples, "synthetic_image_size": image_size} if domain == "healthcare" else {
        **config_defaults(__import__(f"domains.{domain}", fromlist=["SPEC"]).SPEC.config), **({"synthetic_rows": samples} if domain == "finance" else {"sim_vehicles": samples})}  # fmt: skip
    print("| path | setup CPU s | train samples/CPU s (epoch 0, 1) | val samples/CPU s (pass 0, 1) | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for path in (str(shards), None):
        out = shards.parent / "rates.json"
        child = multiprocessing.get_context("spawn").Process(target=read_rates, args=(domain, source, path, batch_size, str(out)))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"the {'shards' if path else 'memory'} reader failed (exit {child.exitcode})")
        r = json.loads(out.read_text())
        rate = lambda key: f"{r[key]['samples'] / max(r[key]['cpu_s'], 1e-9):,.0f}"  # noqa: E731
        print(f"| {r['path']} | {r['setup_cpu_s']:.2f} | {rate('train0')}, {rate('train1')} ({r['train0']['samples']}) | "
              f"{rate('val0')}, {rate('val1')} ({r['val0']['samples']}) | {r['peak_rss_mib']:.0f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", choices=sorted(FIELDS), default="healthcare")
    parser.add_argument("--samples", type=int, default=None, help="images, transactions or simulated vehicles (default: DEFAULTS)")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--samples_per_shard", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shards_multiple_of", type=int, default=None, help="the writer's option (default: 2 processes x max(1, workers))")
    parser.add_argument("--one_process", action="store_true", help="no DDP run: read the shards and the in-memory source side by side in one process each")
    args = parser.parse_args()
    defaults = DEFAULTS[args.domain]
    args.samples, args.samples_per_shard, args.batch_size = (given or default for given, default in zip((args.samples, args.samples_per_shard, args.batch_size), defaults))
    multiple = args.shards_multiple_of or 2 * max(1, args.workers)

    with tempfile.TemporaryDirectory() as folder:
        shards, out = Path(folder) / "shards", Path(folder) / "ranks"
        out.mkdir()
        started = time.process_time()
        manifest = write_set(args.domain, args.samples, args.image_size, shards, args.samples_per_shard, multiple)
        write_cpu = time.process_time() - started
        shard_mib = sum(p.stat().st_size for p in shards.iterdir()) / 2**20
        if args.one_process:
            print(f"{args.domain}: --samples {args.samples}, batch {args.batch_size}, {shard_mib:.1f} MiB of shards, writer {write_cpu:.1f} s CPU")
            return one_process(args.domain, args.samples, args.image_size, shards, args.batch_size)
        run_ddp(shards, out, args.batch_size, args.workers, args.epochs, args.domain)
        summary = check_ranks(shards, out, args.batch_size, args.workers, args.epochs, args.domain)
        ranks = [[json.loads((out / f"rank{r}-epoch{e}.json").read_text()) for e in range(args.epochs)] for r in range(2)]
    train = manifest["splits"]["train"]
    val = summary["val/0"]
    size = f", {args.image_size}px" if args.domain == "healthcare" else ""
    print(f"{args.domain} shards: {sum(e['samples'] for e in train)} training samples in {len(train)} shards of at most {args.samples_per_shard} "
          f"(--shards_multiple_of {multiple}){size}, {shard_mib:.1f} MiB in all; validation {val['samples']} samples, {val['skipped']} unread per epoch; "
          f"writer {write_cpu:.1f} s CPU (main process) for --samples {args.samples}")  # fmt: skip
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
    name = "shards_ddp.json" if args.domain == "healthcare" else f"shards_ddp-{args.domain}.json"
    (RESULTS / name).write_text(json.dumps({"args": vars(args), "write_cpu_s": write_cpu, "shard_mib": shard_mib, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
