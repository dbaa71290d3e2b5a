"""Write sensor windows as row shards for many nodes: ``python -m domains.autonomous.shards_write --output DIR
[--samples_per_shard 4096] [--shards_multiple_of 1] [--data.X ...]``.

``--data.X`` are the data module's options, as ``python -m pipelines.run autonomous`` takes them, with the same
defaults (``domains/autonomous/config.yaml``: the simulator): ``--data.path`` and the columns for a table,
``--data.eth_ucy_root`` for ETH/UCY, ``--data.streaming true`` to read a table in chunks. The source is read, checked,
split and cut into windows, and the statistics fitted on the training split, as a run does; then each split's windows
(the items a run's loader collates: ``past``, ``channels``, ``future``, ``label``, covariates, ``index``...) go to
``<split>-000000.tar``, ... (at most ``--samples_per_shard`` windows each, sizes differing by at most one, their number
a multiple of ``--shards_multiple_of``: the DDP processes x loader workers that will read them; the training split in
an order shuffled with ``--data.split_seed``, validation and test in the source's order), in blocks of 256 windows
(:mod:`pipelines.row_shards`). ``manifest.json`` records the shards (windows, bytes, SHA-256), the fitted state, each
window's segment name and the options the source was read with. The folder is written under a temporary name and
renamed: complete or absent. Train from it with ``python -m pipelines.run autonomous --data.shards DIR``
(:mod:`domains.autonomous.shards`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from domains.autonomous import SPEC
from domains.autonomous.shards import KIND, RUN_OPTIONS, SPLITS
from pipelines.errors import InputError
from pipelines.row_shards import write_split, writer_main
from pipelines.shards import ShardSetWriter


def write_shards(data: dict[str, Any], output: str, samples_per_shard: int, multiple_of: int = 1) -> dict[str, Any]:
    """Read the data module's source (``data``: its options) and write its splits' windows as shards into ``output``; the manifest."""
    from domains.autonomous.data import SensorSequenceDataModule

    if data.get("shards"):
        raise InputError("--data.shards reads shards; the writer reads a source (--data.path, --data.eth_ucy_root or the simulator)")
    if data.get("predict_path"):
        raise InputError("--data.predict_path is the file a predict run reads; the writer writes the training source's splits: drop it")
    writer = ShardSetWriter(output, samples_per_shard, KIND, multiple_of)  # the destination refused before any row is read
    module = SensorSequenceDataModule(**data)
    module.setup("fit")  # read, checked, split, windowed and fitted as a run does
    state, names = module.state_dict(), {}
    with writer:
        for split in SPLITS:
            dataset = module.datasets[split]
            order = np.random.default_rng(module.hparams.split_seed).permutation(len(dataset)) if split == "train" else np.arange(len(dataset))
            fields = write_split(writer, split, dataset, order, chunk_rows=4096)
            names[split] = [dataset.names[i] for i in range(len(dataset))]
        options = {name: value for name, value in module.hparams.items() if name not in RUN_OPTIONS}  # a run beside the shards may not ask for others
        source = str(module.hparams.path or module.hparams.eth_ucy_root or "simulator")
        manifest = writer.finish({"state": state, "fields": fields, "names": names, "source": source, "options": options})
    return manifest


def main(argv: list[str] | None = None) -> None:
    from domains.autonomous.data import SensorSequenceDataModule

    writer_main("python -m domains.autonomous.shards_write", __doc__, SensorSequenceDataModule, SPEC.config, write_shards, argv, samples_per_shard=4096, unit="windows")


if __name__ == "__main__":
    main()
