"""Growth curves: each domain at 1x, 4x and 16x its default data, fit and predict.

    python -m benchmarks.scaling [--domains finance autonomous healthcare media] [--scales 1 4 16] [--epochs 1]
                                 [--finance-files] [--autonomous-files] [--finance-scoring-rows 20000000 [--finance-scoring-format parquet]]
                                 [--healthcare-images 50000 [--healthcare-image-size 28]] [--healthcare-small-network]

For every domain and scale, in new processes (``python -m pipelines.run``, W&B offline):

- ``fit``: ``--trainer.max_epochs`` epochs on the domain's synthetic generator grown ``scale`` times
  (finance ``synthetic_rows``, autonomous ``sim_vehicles``, healthcare and media ``synthetic_samples``);
  training samples per wall second and per CPU second of the process over the training batches
  (:class:`CpuTrainingThroughput`, validation excluded), wall time and CPU time (user + system) of the
  whole command and its peak resident memory. Media's fit runs without validation (``FIT_OPTIONS``: no FID of
  generated samples, so the row measures the training loop) but still trains the data set's feature extractor
  first (a fixed cost: ``extractor_steps`` batches on at most ``extractor_max_images`` images);
- ``predict`` with ``--ckpt_path best`` (media: ``last``, its fit validated nothing) on that run: finance scores a
  separate synthetic file of ``scale`` x its default rows (``--data.predict_path``, streamed in chunks); autonomous
  predicts its test split (it grows with the data); healthcare classifies a folder of ``scale`` x 900 new synthetic
  lesion PNGs of its default 32 px (``--data.predict_dir``, read per item: ``--data.streaming true``); media
  generates ``scale`` x 256 images (``--data.num_generate``: generation reads no data, so this grows the number of
  images, not the training set). Wall and CPU time, rows written per second and peak resident memory.

``--finance-files``: finance also trains from a CSV file of ``scale`` x 20 000 synthetic rows, once
read whole (``--data.path``, the pandas table in memory) and once streamed (``--data.streaming true``,
``domains.finance.streaming``: chunks into a memory-mapped cache, rebuilt for each run), to compare
their fit peak RSS. ``--autonomous-files``: likewise for autonomous, a CSV of ``scale`` x 400 simulated vehicles (40 rows
each), read whole or streamed (``domains.autonomous.streaming``, a fresh cache per run); its ``predict`` then scores
another such file (``--data.predict_path``) read the same way. ``--finance-scoring-rows N`` adds a row scoring an N-row file (e.g. 20 000 000)
with the 1x model; ``--finance-scoring-format parquet`` writes that file as Parquet with pyarrow, a row group
per 100 000 rows (a 20M-row CSV through pandas takes hours on a busy machine), and scoring streams its row groups;
``--finance-scoring-distinct-blocks K`` generates only K blocks of 500 000 rows and writes them in turn (the generator,
not the writer, is what takes an hour for 20M rows on a busy machine); ``--finance-scoring-file F`` scores an existing
file instead (e.g. one kept from an earlier run).

``--healthcare-images N``: healthcare trains one epoch on N synthetic lesion PNGs (``--healthcare-image-size``
pixels a side, a labels CSV, stratified split) three ways: decoded into memory at setup, read per item
(``--data.streaming true``) and from a fresh pixel cache (``--data.cache_dir``, built inside the fit), with
a small network (``HEALTHCARE_MODEL``) so that the data, not the model, is what is measured.

Time should grow linearly with the data and predict memory stay flat (the fitted state comes from
the checkpoint; predictions are written batch by batch, ``return_predictions=False``). Peak RSS and CPU time
are read through a small intermediary process (``_USAGE_OF``: a process forked from this one would report at
least this one's size). On a shared machine the samples per CPU second are the steadier rate. Prints a table; writes
``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from benchmarks.common import ROOT, TrainingThroughput, child_env, print_table, write_results
from pipelines.domain_registry import available_domains

#: runs a command as its child and prints the child's peak RSS (KiB) and CPU seconds (user, system): a process forked from
#: this one would report at least this one's size (``benchmarks.performance._PEAK_RSS_OF``, with the CPU time added)
_USAGE_OF = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
             "u = resource.getrusage(resource.RUSAGE_CHILDREN); print(u.ru_maxrss, u.ru_utime, u.ru_stime); sys.exit(code)")  # fmt: skip

#: the data option each domain grows and its default value (the domains' config.yaml / __init__ defaults)
SIZE_OPTIONS: dict[str, tuple[str, int]] = {
    "finance": ("synthetic_rows", 20000),
    "autonomous": ("sim_vehicles", 400),
    "healthcare": ("synthetic_samples", 900),
    "media": ("synthetic_samples", 1536),
}
FINANCE_SCORING_ROWS = 20000


class CpuTrainingThroughput(TrainingThroughput):
    """:class:`benchmarks.common.TrainingThroughput` plus the CPU seconds of the process (all its threads, user and system,
    ``time.process_time``) over the same window: on a shared machine the samples per CPU second move far less than the
    samples per wall second when other jobs take the cores."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._cpu_start = self._cpu_last = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._cpu_last = time.process_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # appends this epoch's record (and writes the file)
        self.epochs[-1]["cpu_seconds"] = self._cpu_last - self._cpu_start
        if trainer.is_global_zero:
            self.output.write_text(json.dumps(self.epochs))


def throughput_options(output: Path) -> list[str]:
    return ["--trainer.callbacks+=benchmarks.scaling.CpuTrainingThroughput", f"--trainer.callbacks.output={output}"]


def training_rates(output: Path) -> dict[str, Any]:
    """Training samples and samples per wall and per CPU second over the epochs ``CpuTrainingThroughput`` wrote to ``output``."""
    epochs = json.loads(output.read_text())
    samples, seconds, cpu = (sum(e[key] for e in epochs) for key in ("samples", "seconds", "cpu_seconds"))
    return {"train_samples": samples, "fit_samples_per_s": samples / seconds if seconds else None,
            "fit_samples_per_cpu_s": samples / cpu if cpu else None, "train_batches_s": seconds, "train_batches_cpu_s": cpu}  # fmt: skip


#: ``--torch-threads N``: the children's ``OMP_NUM_THREADS`` (torch's intra-op threads); unset, torch takes every core
TORCH_THREADS: dict[str, str] = {}


def timed(command: list[str]) -> dict[str, float]:
    """Wall time, CPU seconds (user + system of the child) and peak RSS (MiB) of a ``pipelines.run`` command in a new
    process; raises on failure."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _USAGE_OF, sys.executable, "-m", "pipelines.run", *command],
                          cwd=ROOT, env={**child_env(), **TORCH_THREADS}, capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"pipelines.run {' '.join(command)} exited with {done.returncode}: {done.stderr[-2000:]}")
    peak_kib, user, system = done.stdout.split()[-3:]
    return {"wall_s": time.perf_counter() - start, "cpu_s": float(user) + float(system), "peak_rss_mib": int(peak_kib) / 1024}


def finance_file(folder: Path, rows: int, labels: bool = True, seed: int = 7, block: int = 500_000, file_format: str = "csv",
                 distinct_blocks: int | None = None) -> Path:  # fmt: skip
    """A synthetic finance CSV or Parquet file of ``rows`` rows (with or without labels), generated and written
    ``block`` rows at a time (Parquet: 100 000-row row groups, so neither the writer nor the scoring reader holds
    more than a block). ``distinct_blocks`` (Parquet): only that many blocks are generated (the generator takes
    minutes a block on a busy machine), then written again in turn with their ``transaction_id`` prefixed ``c<copy>-``."""
    from domains.finance.synthetic import make_card_transactions

    path = folder / f"{'train' if labels else 'score'}-{rows}.{file_format}"
    if path.exists():
        return path
    partial, writer, generated = path.with_suffix(".partial"), None, {}
    try:
        for number, start in enumerate(range(0, rows, block)):
            if file_format == "csv":
                frame = make_card_transactions(max(10, min(block, rows - start)), seed=seed + start)
                frame = (frame if labels else frame.drop(columns=["is_fraud"])).head(rows - start)
                frame.to_csv(partial, index=False, mode="a", header=start == 0)
                continue
            import pyarrow as pa
            import pyarrow.compute as pc
            import pyarrow.parquet as pq

            source = number % distinct_blocks if distinct_blocks else number
            if source not in generated:
                frame = make_card_transactions(block, seed=seed + source * block)
                table = pa.Table.from_pandas(frame if labels else frame.drop(columns=["is_fraud"]), preserve_index=False)
                if not distinct_blocks:
                    generated.clear()
                generated[source] = table
            table = generated[source].slice(0, rows - start)
            if number >= (distinct_blocks or rows):
                table = table.set_column(0, "transaction_id", pc.binary_join_element_wise(pa.scalar(f"c{number}-", pa.large_string()), table["transaction_id"], pa.scalar("", pa.large_string())))
            writer = writer or pq.ParquetWriter(partial, table.schema)
            writer.write_table(table.cast(writer.schema), row_group_size=100_000)
    finally:
        if writer is not None:
            writer.close()
    partial.replace(path)
    return path


def scoring_file(folder: Path, rows: int, file_format: str = "csv", distinct_blocks: int | None = None) -> Path:
    """A synthetic finance table of ``rows`` rows without labels, to score."""
    return finance_file(folder, rows, labels=False, file_format=file_format, distinct_blocks=distinct_blocks)


#: the network of the ``--healthcare-images`` rows: small, so an epoch of 50 000 images fits a benchmark run on 2 cores
HEALTHCARE_MODEL = ["--model.network=resnet10", "--model.width=0.25", "--data.batch_size=256"]
#: ``--healthcare-small-network``: the growth rows' network (the config's batch size and 32 px images kept); the
#: config's ResNet-18 takes about 45 CPU s for the 630 training images of 1x, so 16x is ~12 CPU minutes an epoch
HEALTHCARE_SMALL_NETWORK = ["--model.network=resnet10", "--model.width=0.25"]
#: how the healthcare images are read: decoded into memory at setup, per item, from the pixel cache
IMAGE_SOURCES = {"in memory": [], "streaming": ["--data.streaming=true"], "streaming, cache": ["--data.streaming=true", "--data.cache_dir={cache}"]}


def lesion_pngs(folder: Path, count: int, size: int, block: int = 5000) -> Path:
    """``count`` synthetic lesion PNGs (``domains.healthcare.synthetic``) and their ``labels.csv``, ``block`` images generated at a time."""
    import pandas as pd
    from PIL import Image

    from domains.healthcare.synthetic import CLASS_NAMES, make_lesion_images

    root = folder / f"lesions-{count}-{size}"
    labels = root / "labels.csv"
    if labels.exists():
        return labels
    rows = []
    for start in range(0, count, block):
        images, classes = make_lesion_images(min(block, count - start), size, seed=start)
        for i, (image, label) in enumerate(zip(images, classes)):
            name = f"{(start + i) // 1000:03d}/{start + i:06d}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / name)
            rows.append((name, CLASS_NAMES[label]))
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(labels.with_suffix(".partial"), index=False)
    labels.with_suffix(".partial").replace(labels)
    return labels


NO_PREDICT = {"predict_rows": None, "predict_wall_s": None, "predict_cpu_s": None, "predict_rows_per_s": None, "predict_peak_rss_mib": None}


def measure_images(count: int, size: int, epochs: int, folder: Path, source: str, batches: int | None = None) -> dict[str, Any]:
    """One ``fit`` of healthcare on ``count`` PNGs read ``source``'s way: wall time, training samples/s, peak RSS. ``batches``
    limits the training and validation batches (setup still reads, checks or caches every image)."""
    run_id = f"healthcare-{count}-{source.replace(', ', '-').replace(' ', '-')}"
    throughput = folder / f"throughput-{run_id}.json"
    data = [a.format(cache=folder / f"cache-{run_id}") for a in IMAGE_SOURCES[source]]
    fit = timed([
        "healthcare", "fit", "--runs_dir", str(folder / "runs"), "--run_id", run_id, "--trainer.enable_progress_bar=false",
        "--data.labels_csv", str(lesion_pngs(folder, count, size)), *data, *HEALTHCARE_MODEL, f"--trainer.max_epochs={epochs}",
        *([f"--trainer.limit_train_batches={batches}", f"--trainer.limit_val_batches={batches}"] if batches else []),
        "--trainer.enable_model_summary=false", *throughput_options(throughput),
    ])  # fmt: skip
    return {"domain": "healthcare", "scale": f"{count} images {size}px", "source": source, **training_rates(throughput), "fit_wall_s": fit["wall_s"],
            "fit_cpu_s": fit["cpu_s"], "fit_peak_rss_mib": fit["peak_rss_mib"], **NO_PREDICT}  # fmt: skip


def autonomous_file(folder: Path, vehicles: int, seed: int = 0) -> Path:
    """The simulator's long table of ``vehicles`` episodes (its defaults: 40 rows at 0.25 s, grouped by vehicle) as a CSV."""
    from domains.autonomous.simulator import simulate_vehicles

    path = folder / f"vehicles-{vehicles}-{seed}.csv"
    if not path.exists():
        simulate_vehicles(vehicles, 40, 0.25, seed, 0.003).to_csv(path.with_suffix(".partial"), index=False)
        path.with_suffix(".partial").replace(path)
    return path


#: images ``predict`` generates per scale for media: generation does not read the data, so its ``predict`` grows with
#: the number of images asked for (``--data.num_generate``), not with the training set
MEDIA_GENERATED_PER_SCALE = 256
#: options of the growth rows' ``fit`` beyond the data size: media's one epoch trains without validation (FID of generated
#: samples against the validation split's reference), so its row measures the training loop; its fit still trains the
#: data set's feature extractor first (``extractor_steps`` batches on at most ``extractor_max_images`` images: a fixed cost)
FIT_OPTIONS = {"media": ["--trainer.limit_val_batches=0"]}
#: the checkpoint ``predict`` starts from: media's fit without validation leaves no ``best.ckpt``
PREDICT_CHECKPOINT = {"media": "last"}
#: healthcare's default synthetic images (``synthetic_image_size``), the size of the PNGs its ``predict`` classifies
HEALTHCARE_DEFAULT_IMAGE_SIZE = 32


def predict_options(domain: str, scale: int, folder: Path, source: str = "generator") -> list[str]:
    if domain == "autonomous" and source != "generator":  # a new file of as many vehicles, read as the training file was
        return ["--data.predict_path", str(autonomous_file(folder, SIZE_OPTIONS[domain][1] * scale, seed=1))]
    if domain == "finance":
        return ["--data.predict_path", str(scoring_file(folder, FINANCE_SCORING_ROWS * scale))]
    if domain == "healthcare":  # a folder of as many new images as the training data, read per item (predict_dir)
        labels = lesion_pngs(folder, SIZE_OPTIONS[domain][1] * scale, HEALTHCARE_DEFAULT_IMAGE_SIZE)
        return ["--data.predict_dir", str(labels.parent), "--data.streaming=true"]
    if domain == "media":
        return [f"--data.num_generate={MEDIA_GENERATED_PER_SCALE * scale}"]
    return []


#: how the finance training data is read: the synthetic generator, a CSV read whole, a CSV streamed
SOURCES = {"generator": [], "file": ["--data.path", "{file}"], "file, streaming": ["--data.path", "{file}", "--data.streaming=true", "--data.cache_dir={cache}"]}


def measure(domain: str, scale: int, epochs: int, folder: Path, source: str = "generator", scoring_rows: int | None = None, fit_only: bool = False,
            scoring_format: str = "csv", distinct_blocks: int | None = None, model: list[str] = ()) -> dict[str, Any]:  # fmt: skip
    """One growth row: ``fit`` (with the model options ``model`` beyond the domain's config), then ``predict``."""
    option, default = SIZE_OPTIONS[domain]
    runs, run_id = folder / "runs", f"{domain}-x{scale}-{source.replace(', ', '-')}"
    throughput = folder / f"throughput-{run_id}.json"
    common = ["--runs_dir", str(runs), "--run_id", run_id, "--trainer.enable_progress_bar=false"]
    data = [f"--data.{option}={default * scale}"]
    if source != "generator":
        cache = folder / f"cache-{run_id}"
        file = finance_file(folder, default * scale) if domain == "finance" else autonomous_file(folder, default * scale)
        data = [a.format(file=file, cache=cache) for a in SOURCES[source]]
    fit = timed([
        domain, "fit", *common, *data, f"--trainer.max_epochs={epochs}", "--trainer.enable_model_summary=false",
        *FIT_OPTIONS.get(domain, []), *model, *throughput_options(throughput),
    ])  # fmt: skip
    run = runs / domain / run_id
    result = {"domain": domain, "scale": scale, "source": source, option: default * scale, "model": list(model), **training_rates(throughput), "fit_wall_s": fit["wall_s"],
              "fit_cpu_s": fit["cpu_s"], "fit_peak_rss_mib": fit["peak_rss_mib"]}  # fmt: skip
    if fit_only:
        return {**result, **NO_PREDICT}
    given = folder / f"score-{scoring_rows}.{scoring_format}"  # (main: --finance-scoring-file is linked there)
    scoring = predict_options(domain, scale, folder, source) if not scoring_rows else [
        "--data.predict_path", str(given if given.exists() else scoring_file(folder, scoring_rows, scoring_format, distinct_blocks))]
    predict = timed([domain, "predict", *common, *data, "--ckpt_path", PREDICT_CHECKPOINT.get(domain, "best"), *scoring])
    written = sum(1 for _ in (run / "predictions.csv").open()) - 1 if (run / "predictions.csv").is_file() else 0
    return {
        **result, "predict_rows": written, "predict_wall_s": predict["wall_s"], "predict_cpu_s": predict["cpu_s"],
        "predict_rows_per_s": written / predict["wall_s"], "predict_peak_rss_mib": predict["peak_rss_mib"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="*", default=available_domains())
    parser.add_argument("--scales", nargs="*", type=int, default=[1, 4, 16])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--fit-only", action="store_true", help="measure fit only (no predict)")
    parser.add_argument("--finance-files", action="store_true", help="finance also from a CSV file, read whole and streamed")
    parser.add_argument("--autonomous-files", action="store_true", help="autonomous also from a CSV file, read whole and streamed")
    parser.add_argument("--finance-scoring-rows", type=int, default=None, help="add a row scoring a file of this many rows (1x model)")
    parser.add_argument("--finance-scoring-format", choices=["csv", "parquet"], default="csv",
                        help="file format of the --finance-scoring-rows file (parquet: written and scored in row groups)")
    parser.add_argument("--finance-scoring-distinct-blocks", type=int, default=None,
                        help="parquet: generate only this many 500 000-row blocks and write them in turn (ids made unique)")
    parser.add_argument("--finance-scoring-file", type=Path, default=None,
                        help="score this existing file (written by an earlier run: score-<rows>.<format>) instead of writing one")
    parser.add_argument("--healthcare-images", type=int, default=None, help="add healthcare fits on this many PNGs, in memory, streamed and cached")
    parser.add_argument("--healthcare-image-size", type=int, default=28, help="side of the --healthcare-images PNGs")
    parser.add_argument("--healthcare-batches", type=int, default=None, help="limit the --healthcare-images fits to this many training (and validation) batches")
    parser.add_argument("--healthcare-small-network", action="store_true",
                        help="healthcare growth rows train HEALTHCARE_SMALL_NETWORK instead of the config's ResNet-18 (16x in minutes on a busy 2-core machine)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads of every child (OMP_NUM_THREADS): 1 keeps CPU seconds a measure of work on a shared "
                             "machine (threads waiting for a taken core spin and count as CPU time)")
    args = parser.parse_args(argv)
    if args.torch_threads is not None:
        TORCH_THREADS["OMP_NUM_THREADS"] = str(args.torch_threads)
    unknown = sorted(set(args.domains) - set(SIZE_OPTIONS))
    if unknown:
        parser.error(f"no size option known for {unknown}; known: {sorted(SIZE_OPTIONS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        for domain in args.domains:
            for scale in args.scales:
                files = (domain == "finance" and args.finance_files) or (domain == "autonomous" and args.autonomous_files)
                for source in ("generator", "file", "file, streaming") if files else ("generator",):
                    model = HEALTHCARE_SMALL_NETWORK if domain == "healthcare" and args.healthcare_small_network else []
                    results.append(measure(domain, scale, args.epochs, Path(tmp), source, fit_only=args.fit_only, model=model))
                    print(f"[scaling] {domain} x{scale} ({source}): {json.dumps(results[-1])}", flush=True)
        if args.finance_scoring_file:
            (Path(tmp) / f"score-{args.finance_scoring_rows}.{args.finance_scoring_format}").hardlink_to(args.finance_scoring_file)
        if args.finance_scoring_rows:
            results.append(measure("finance", 1, args.epochs, Path(tmp), "file, streaming", scoring_rows=args.finance_scoring_rows,
                                   scoring_format=args.finance_scoring_format, distinct_blocks=args.finance_scoring_distinct_blocks))  # fmt: skip
            print(f"[scaling] finance scoring {args.finance_scoring_rows} rows ({args.finance_scoring_format}): {json.dumps(results[-1])}", flush=True)
        for source in IMAGE_SOURCES if args.healthcare_images else ():
            results.append(measure_images(args.healthcare_images, args.healthcare_image_size, args.epochs, Path(tmp), source, args.healthcare_batches))
            print(f"[scaling] healthcare {args.healthcare_images} images ({source}): {json.dumps(results[-1])}", flush=True)
    shown = (lambda value, digits: "-" if value is None else f"{value:.{digits}f}")  # noqa: E731  (--fit-only: no predict figures)
    rows = [
        [r["domain"], f"{r['scale']}x {r['source']}" if isinstance(r["scale"], int) else f"{r['scale']}, {r['source']}", r["train_samples"],
         shown(r["fit_wall_s"], 1), shown(r["fit_cpu_s"], 1), shown(r["fit_samples_per_s"], 0), shown(r["fit_samples_per_cpu_s"], 0), shown(r["fit_peak_rss_mib"], 0),
         r["predict_rows"] or "-", shown(r["predict_wall_s"], 1), shown(r["predict_cpu_s"], 1), shown(r["predict_rows_per_s"], 0), shown(r["predict_peak_rss_mib"], 0)]
        for r in results
    ]  # fmt: skip
    headers = ["domain", "data", "train samples", "fit wall s", "fit CPU s", "fit samples/s", "fit samples/CPU s", "fit peak RSS MiB",
               "predict rows", "predict wall s", "predict CPU s", "predict rows/s", "predict peak RSS MiB"]  # fmt: skip
    table = print_table(headers, rows)
    write_results("scaling", {"args": vars(args), "results": results, "table": table, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


if __name__ == "__main__":
    main()
