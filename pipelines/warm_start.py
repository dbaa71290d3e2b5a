"""``WarmStart``: start a training from a registry version's weights (safetensors, weights only).

Retraining names it on the training child's command line (``--trainer.callbacks+=pipelines.warm_start.WarmStart``),
so only that child imports this module (and Lightning).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl


class WarmStart(pl.Callback):
    """Load weights (a ``.safetensors`` state dict of the LightningModule) before training starts.

    Weights only: the optimizer, schedule and epoch counter start fresh. Tensors whose name or
    shape differs are left at their initialisation and reported. Usable with the plain runner::

        python -m pipelines.run healthcare --trainer.callbacks+=pipelines.warm_start.WarmStart \\
            --trainer.callbacks.weights=registry/healthcare/versions/v0003/model.safetensors

    Args:
        weights: path of the ``.safetensors`` file.
    """

    def __init__(self, weights: str) -> None:
        self.weights = weights

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from safetensors.torch import load_file

        path = Path(self.weights)
        if not path.is_file():
            raise FileNotFoundError(f"WarmStart: weights file {path} does not exist (expected a .safetensors state dict)")
        loaded = load_file(str(path))
        own = pl_module.state_dict()
        usable = {k: v for k, v in loaded.items() if k in own and own[k].shape == v.shape}
        pl_module.load_state_dict(usable, strict=False)
        skipped = sorted(set(own) - set(usable))
        print(f"[retrain] warm start from {path}: {len(usable)} tensor(s) loaded, {len(skipped)} kept at initialisation", file=sys.stderr)
