"""Write finance transactions as row shards for many nodes: ``python -m domains.finance.shards_write --output DIR
[--samples_per_shard 16384] [--shards_multiple_of 1] [--data.X ...]``.

``--data.X`` are the data module's options, as ``python -m pipelines.run finance`` takes them, with the same defaults
(``domains/finance/config.yaml``: the synthetic set and its column roles): ``--data.path`` and the column roles for a
table, ``--data.streaming true`` to read it in chunks. The source is read, checked, split and the preprocessing fitted
on the training split as a run does, and each split's encoded rows (the batch fields: ``numeric``, ``categorical``,
``label``, ``row``, ``fit_row``) go to ``<split>-000000.tar``, ... (at most ``--samples_per_shard`` rows each, sizes
differing by at most one, their number a multiple of ``--shards_multiple_of``: the DDP processes x loader workers that
will read them; the training split in an order shuffled with ``--data.split_seed``, validation and test in the source's
order), in blocks of 256 rows (:mod:`pipelines.row_shards`). ``manifest.json`` records the shards (rows, bytes,
SHA-256), the fitted state (preprocessing, split rule, drift reference), the split sizes and class balance, and the
options the source was read with. The folder is written under a temporary name and renamed: complete or absent. Train
from it with ``python -m pipelines.run finance --data.shards DIR`` (:mod:`domains.finance.shards`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from domains.finance import SPEC
from domains.finance.shards import KIND, RUN_OPTIONS
from pipelines.errors import InputError
from pipelines.row_shards import writer_main, write_split
from pipelines.shards import ShardSetWriter

SPLIT_ORDER = ("train", "val", "test")


def write_shards(data: dict[str, Any], output: str, samples_per_shard: int, multiple_of: int = 1) -> dict[str, Any]:
    """Read the data module's source (``data``: its options) and write its encoded splits as shards into ``output``; the manifest."""
    from domains.finance.data import TransactionDataModule

    if data.get("shards"):
        raise InputError("--data.shards reads shards; the writer reads a source (--data.path or the synthetic set)")
    if data.get("predict_path"):
        raise InputError("--data.predict_path is the file a predict run scores; the writer writes the training source's splits: drop it")
    writer = ShardSetWriter(output, samples_per_shard, KIND, multiple_of)  # the destination refused before any row is read
    module = TransactionDataModule(**data)
    module.setup("fit")  # read, checked, split, fitted and encoded as a run does
    state, facts = module.state_dict(), module.describe_data()
    with writer:
        for split in SPLIT_ORDER:
            dataset = module._split(split)
            order = np.random.default_rng(module.hparams.split_seed).permutation(len(dataset)) if split == "train" else np.arange(len(dataset))
            fields = write_split(writer, split, dataset, order)
        options = {name: value for name, value in module.hparams.items() if name not in RUN_OPTIONS}  # a run beside the shards may not ask for others
        manifest = writer.finish({"state": state, "fields": fields, "facts": facts, "source": module.source_name, "options": options})
    return manifest


def main(argv: list[str] | None = None) -> None:
    from domains.finance.data import TransactionDataModule

    writer_main("python -m domains.finance.shards_write", __doc__, TransactionDataModule, SPEC.config, write_shards, argv, samples_per_shard=16384)


if __name__ == "__main__":
    main()
