"""The columns ``predict`` writes for a batch of windows (``predictions.csv``; 2-D columns become ``name_0, name_1, ...``).

Always: ``sequence`` (the segment of the window) and ``time`` (its last observed row). Then per task:

- forecasting: ``pred_<channel>_<step>`` (positions, data units; steps 0-based) and ``true_<channel>_<step>``
  when the future is known; a quantile model adds ``q<level>_<channel>_<step>`` per level (``q10_x_3``,
  sorted so that levels do not cross; ``pred_`` is the median); the CVAE and the mixture add their
  ``num_samples`` futures ``sample<k>_<channel>_<step>`` (k from 0) and the mixture the probability
  of each of those modes, ``sample<k>_probability`` (most probable first; futures drawn beyond its
  ``modes`` have none, and the CVAE's draws are equally likely: no column);
- regression: ``prediction`` (the median for a quantile model) and ``q<level>`` per level, ``target`` when known;
- classification: ``prediction``, ``prob_<class>`` (calibrated), ``label`` when known;
- with ``--explain`` (or ``--model.explain true``): ``attribution_<channel>`` per window (``attributions.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from domains.autonomous.attributions import input_names
from domains.autonomous.evaluation import occlusion
from pipelines.quantiles import quantile_label


def prediction_columns(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``model``: a :class:`~domains.autonomous.model.SensorSequenceModel` in ``predict``; ``batch``: after the data module's transfer."""
    hp = model.hparams
    datamodule = model.trainer.datamodule
    columns: dict[str, Any] = {"sequence": [datamodule.window_name(int(i)) for i in batch["index"]], "time": batch["time"]}
    levels = model.quantile_levels
    if hp.task == "forecasting":
        # positions are centred on each window's last observation (float32); its origin is added back in float64
        origin = batch["origin"][:, None].double() if "origin" in batch else 0.0
        pred = model._predictions(batch)
        names = hp.target_names or [str(i) for i in range(hp.target_dim)]
        single = pred["single"].double() + origin
        columns |= {f"pred_{name}": single[..., i] for i, name in enumerate(names)}
        for q, level in enumerate(levels):
            values = pred["quantiles"][:, q].double() + origin
            columns |= {f"{quantile_label(level)}_{name}": values[..., i] for i, name in enumerate(names)}
        if "samples" in pred:
            columns |= _samples(model, batch, pred["samples"].double() + (origin[:, None] if torch.is_tensor(origin) else 0.0), names)
        if "future" in batch:
            future = batch["future"].double() + origin
            columns |= {f"true_{name}": future[..., i] for i, name in enumerate(names)}
    elif hp.task == "regression":
        out = model.network(batch["inputs"])
        if "target_std" in batch:
            values = model.regression_values(out, batch["target_mean"], batch["target_std"])
        else:
            values = model.regression_values(out, float(datamodule.stats["target_mean"]), float(datamodule.stats["target_std"]))
        columns["prediction"] = values[:, model.point_index]
        columns |= {quantile_label(level): values[:, q] for q, level in enumerate(levels)}
        if "target" in batch:
            columns["target"] = batch["target"]
    else:
        names = list(hp.class_names or [str(i) for i in range(hp.num_classes)])
        probs = model.calibration.probabilities(model.network(batch["inputs"]))
        columns["prediction"] = [names[i] for i in probs.argmax(-1).tolist()]
        columns |= {f"prob_{name}": probs[:, i] for i, name in enumerate(names)}
        if "label" in batch:
            columns["label"] = [names[i] for i in batch["label"].tolist()]
    if model.explain:
        attributions = occlusion(model, batch)
        columns |= {f"attribution_{name}": attributions[:, f] for f, name in enumerate(input_names(datamodule, hp.input_size))}
    return columns


def _samples(model: Any, batch: dict[str, torch.Tensor], samples: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """``sample<k>_<channel>`` (B, T) of the K futures and, for the mixture, ``sample<k>_probability`` of its modes."""
    columns: dict[str, Any] = {}
    for k in range(samples.shape[1]):
        columns |= {f"sample{k}_{name}": samples[:, k, :, i] for i, name in enumerate(names)}
    if model.hparams.architecture == "mixture":
        _, logits = model.network.mixture(batch["inputs"], batch.get("known"))
        probabilities = logits.softmax(-1).sort(-1, descending=True).values  # the order forward() returns the modes in
        for k in range(min(samples.shape[1], probabilities.shape[1])):
            columns[f"sample{k}_probability"] = probabilities[:, k]
    return columns
