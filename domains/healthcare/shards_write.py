"""Write healthcare data as webdataset shards for many nodes: ``python -m domains.healthcare.shards_write --output DIR
[--samples_per_shard 256] [--shards_multiple_of 1] [--data.X ...]``.

``--data.X`` are the data module's options, as ``python -m pipelines.run healthcare`` takes them (the synthetic set by
default; ``--data.labels_csv``, ``--data.npz_path``, ``--data.image_size``, the split options...). The source is read
as ``--data.streaming true`` reads it (each image decoded, checked and resized once, in bounded blocks; with
``--data.cache_dir`` from the pixel cache), split as a run splits it, and the statistics fitted on the training split
as a run fits them. Then each split goes to ``<split>-000000.tar``, ... (at most ``--samples_per_shard`` each, sizes
differing by at most one, their number a multiple of ``--shards_multiple_of``: give the DDP processes x loader workers
that will read them, so each gets an equal share; the training split in an order shuffled with
``--data.split_seed``, so that a shard mixes classes; validation and test in the source's order) and
``manifest.json`` records the shards (samples, bytes, SHA-256), the data module's fitted state (classes, task, image
shape, channel mean/std, drift reference, class weights, split rule), the transform and every item's name. The folder
is written under a temporary name and renamed: complete or absent. Train from it with
``python -m pipelines.run healthcare --data.shards DIR`` (:mod:`domains.healthcare.shards`).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from domains.healthcare.lazy_pixels import LazyPixels, MappedPixels, block_items, blocks_of
from domains.healthcare.shards import WRITER_OPTIONS, KIND, encode
from pipelines.errors import EXIT_BAD_INPUT, InputError, paragraph
from pipelines.shards import ShardSetWriter

SPLIT_ORDER = ("train", "val", "test")


def reordered(images: Any, order: np.ndarray) -> Any:
    """The items of ``images`` (an array, :class:`LazyPixels` or :class:`MappedPixels`) in ``order``."""
    if isinstance(images, LazyPixels):
        return LazyPixels(images.read, images.indices[order], images.sample_shape, images.dtype, images.workers)
    if isinstance(images, MappedPixels):
        return MappedPixels(images.folder, images.indices[order], images.sample_shape, images.dtype)
    return images[order]


def write_shards(data: dict[str, Any], output: str, samples_per_shard: int, multiple_of: int = 1) -> dict[str, Any]:
    """Read the data module's source (``data``: its options) and write its splits as shards into ``output``; the manifest."""
    from domains.healthcare.data import MedicalImageDataModule

    if data.get("shards"):
        raise InputError("--data.shards reads shards; the writer reads a source (--data.labels_csv, --data.npz_path or the synthetic set)")
    writer = ShardSetWriter(output, samples_per_shard, KIND, multiple_of)  # the destination refused before any image is read
    module = MedicalImageDataModule(**{**data, "streaming": True})
    module.setup("fit")
    state = module.state_dict()
    dtypes = {}
    with writer:
        for split in SPLIT_ORDER:
            dataset = module.datasets[split]
            dtypes[split] = str(np.dtype(getattr(dataset.images, "dtype", None) or np.float32))
            order = np.random.default_rng(module.hparams.split_seed).permutation(len(dataset)) if split == "train" else np.arange(len(dataset))
            images = reordered(dataset.images, order)
            writer.begin(split, len(dataset))
            position = 0
            for block in blocks_of(images, block_items(module.image_shape)):
                for pixels in block:
                    item = order[position]
                    writer.add(f"{int(dataset.indices[item]):09d}", encode(pixels, dataset.labels[item]))
                    position += 1
        transform = {"image_shape": list(module.image_shape), "image_size": module.hparams.image_size, "intensity": str(module.intensity), "dtypes": dtypes}
        options = {name: module.hparams.get(name) for name in WRITER_OPTIONS}  # a run beside the shards may not ask for others
        manifest = writer.finish({"state": state, "transform": transform, "source": module._source_label(), "names": list(module.source.names), "options": options})
    return manifest


def _parser() -> Any:
    from jsonargparse import ArgumentParser

    from domains.healthcare.data import MedicalImageDataModule

    parser = ArgumentParser(prog="python -m domains.healthcare.shards_write", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--output", type=str, required=True, help="the shard folder to write (must not exist)")
    parser.add_argument("--samples_per_shard", type=int, default=256, help="the most samples a tar shard holds (a split's shards differ by at most one)")
    parser.add_argument("--shards_multiple_of", type=int, default=1, help="make each split's shard count a multiple of this: the DDP processes x loader "
                        "workers that will read it, so that each gets an equal share")  # fmt: skip
    parser.add_class_arguments(MedicalImageDataModule, "data")
    return parser


def main(argv: list[str] | None = None) -> None:
    from pipelines.messages import show_messages

    show_messages()
    try:
        parser = _parser()
        try:
            args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        except Exception as error:  # jsonargparse's ArgumentError: an unknown or ill-typed option
            raise InputError(str(error).splitlines()[0]) from None
        data = {key: value for key, value in args.data.as_dict().items()}
        manifest = write_shards(data, args.output, args.samples_per_shard, args.shards_multiple_of)
    except InputError as error:
        print(paragraph(str(error)), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    counts = {split: f"{sum(e['samples'] for e in shards)} samples in {len(shards)} shards" for split, shards in manifest["splits"].items()}
    print(f"shards written to {args.output}: " + "; ".join(f"{split} {text}" for split, text in counts.items()))


if __name__ == "__main__":
    main()
