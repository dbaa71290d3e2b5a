"""Bootstrap intervals of healthcare's test metrics, over row counts (:mod:`pipelines.weighted_metrics`).

The values are those torchmetrics gives on each resample's rows, as the logged test metrics are
computed: binary AUROC, accuracy and F1 at the operating threshold (probabilities moved so that it
lands on 0.5, :func:`pipelines.classifier_calibration.decision_centred`); multi-class macro AUROC
(NaN unless every class was drawn), accuracy, macro and per-class F1; the loss as the loss function
averages it (class weights included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.classifier_calibration import decision_centred
from pipelines.weighted_metrics import binary_classification, multiclass_classification, ratio


def resampled_test_values(
    logits: torch.Tensor, target: torch.Tensor, probs: torch.Tensor, threshold: float | None, loss_fn: Any, class_labels: list[str]
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The test metrics of a batch of resamples ``(b, rows)``: ``{name: b values}``. ``threshold``:
    the binary operating threshold (None: multi-class, one logit per class)."""
    logits, target, probs = logits.detach().cpu(), target.detach().cpu(), probs.detach().cpu()
    if threshold is not None:
        row_loss = F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), pos_weight=loss_fn.pos_weight, reduction="none")
        values, names, loss_weight = binary_classification(decision_centred(probs, threshold).numpy(), target.numpy()), [], torch.ones(len(target))
    else:
        row_loss = F.cross_entropy(logits, target.long(), weight=loss_fn.weight, reduction="none")
        loss_weight = loss_fn.weight[target.long()] if loss_fn.weight is not None else torch.ones(len(target))
        values, names = multiclass_classification(probs.numpy(), target.numpy()), class_labels

    def resampled(counts: np.ndarray) -> dict[str, np.ndarray]:
        out = values(counts)
        per_class = out.pop("f1_per_class", None)
        loss = ratio(counts @ row_loss.double().numpy(), counts @ loss_weight.double().numpy(), np.nan)
        return {**{f"test/{k}": v for k, v in out.items()}, "test/loss": loss, **{f"test/f1_{name}": per_class[:, i] for i, name in enumerate(names)}}

    return resampled
