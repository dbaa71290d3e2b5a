"""Per-channel attributions: which input channels a forecast, value or class depends on (occlusion).

For each window and each model input channel (the per-step displacement of every position channel,
named ``d<channel>``, then every sensor channel), the channel is *occluded*: set to 0 over the whole
observed window in the model's normalised input, which is the channel's training mean for the
z-scored sensor channels and "no motion" for the displacements. The attribution is how far the
model's output moves:

- forecasting: the mean Euclidean distance, over the forecast steps, between the forecast positions
  with and without the channel (data units, like ADE; the median for quantile models, the
  deterministic forecast for the CVAE and the mixture);
- regression: the absolute change of the predicted value (the target's units);
- classification: the total variation distance between the class probabilities (0 to 1).

A channel the model ignores scores 0, whatever its values. Occlusion is model-agnostic, needs
no gradient (so it works for the recurrent networks and PatchTST alike) and costs one forward pass
per channel, batched; it measures the effect of removing a channel's information, not of small
changes to it (gradient methods such as Captum's integrated gradients answer that other question).
``test`` logs ``test/attribution_<channel>``, the mean over the test windows, and
``plots/test_channel_attributions.png``; ``predict --explain`` (or ``--model.explain true``) writes
``attribution_<channel>`` per window.

Example:
    >>> linear = lambda x: x[:, -1, 1:2] * 3.0  # depends on the second channel's last value only
    >>> occlusion_attributions(linear, torch.ones(4, 5, 3), lambda a, b: (a - b).abs()[:, 0]).mean(0).tolist()
    [0.0, 3.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback

from pipelines.plots import new_figure


def occlusion_attributions(
    predict: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``(B, F)``: ``distance(predict(inputs with channel f set to 0), predict(inputs))`` for every channel ``f``.

    ``inputs`` is ``(B, T, F)``; ``predict`` maps a batch of inputs to outputs (any shape, batch
    first); ``distance`` maps two such outputs to ``(B,)``. One forward pass over ``(F + 1) * B`` windows.
    """
    batch, _, features = inputs.shape
    occluded = inputs[None].repeat(features + 1, 1, 1, 1)
    for f in range(features):
        occluded[f + 1, :, :, f] = 0.0
    with torch.no_grad():
        outputs = predict(occluded.reshape(-1, *inputs.shape[1:]))
    outputs = outputs.reshape(features + 1, batch, *outputs.shape[1:])
    return torch.stack([distance(outputs[f + 1], outputs[0]) for f in range(features)], 1)


def input_names(datamodule: Any, input_size: int) -> list[str]:
    """``d<position>`` for each position channel's displacement, then the sensor channels (the future-known
    channels' past and the categorical channels last; ``input_<i>`` when the data module cannot say)."""
    positions = list(getattr(datamodule, "position_names", None) or [])
    channels = list(getattr(datamodule, "input_channel_names", None) or getattr(getattr(datamodule, "hparams", None), "channels", None) or [])
    names = [f"d{name}" for name in positions] + channels
    return names if len(names) == input_size else [f"input_{i}" for i in range(input_size)]


def attribution_figure(values: torch.Tensor, names: list[str], unit: str, windows: int) -> Any:
    """Horizontal bars of the mean attribution per channel, the largest on top."""
    order = torch.argsort(values, descending=True).tolist()
    fig, ax = new_figure(figsize=(5.5, 0.45 * len(names) + 1.4))
    ax.barh(range(len(order)), [float(values[i]) for i in order], color="tab:blue")
    ax.set_yticks(range(len(order)), labels=[names[i] for i in order])
    ax.invert_yaxis()
    ax.set_xlabel(f"mean change of the output when the channel is occluded ({unit})")
    ax.set_title(f"Channel attributions, test ({windows} windows)")
    fig.tight_layout()
    return fig


class AttributionColumns(Callback):
    """``predict --explain`` for autonomous models: each window's per-channel attributions become
    ``attribution_<channel>`` columns of the predictions file itself (the same as ``--model.explain true``)."""

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        pl_module.explain = True
