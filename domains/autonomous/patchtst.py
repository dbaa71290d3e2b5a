"""PatchTST from Hugging Face ``transformers``, built from a config object (random initialisation; nothing is downloaded).

Plain ``nn.Module`` (no Lightning): :class:`PatchTSTForecaster` forecasts, and :func:`patchtst_config`
also builds the encoder of :class:`domains.autonomous.networks.SequenceRegressor`.
"""

from __future__ import annotations

import torch
from torch import nn


def patchtst_config(
    input_size: int, observe: int, predict: int, d_model: int, num_heads: int, num_layers: int, patch_length: int, dropout: float, num_targets: int = 1
) -> object:
    """A ``transformers.PatchTSTConfig`` (no hub access; inputs are already normalised, so no scaler)."""
    from transformers import PatchTSTConfig

    if patch_length > observe:
        raise ValueError(f"patch_length ({patch_length}) must not exceed observe ({observe})")
    return PatchTSTConfig(
        num_input_channels=input_size, context_length=observe, prediction_length=max(predict, 1), patch_length=patch_length,
        patch_stride=patch_length, d_model=d_model, num_attention_heads=num_heads, num_hidden_layers=num_layers,
        ffn_dim=2 * d_model, dropout=dropout, attention_dropout=dropout, ff_dropout=dropout, head_dropout=dropout,
        scaling=None, loss="mse", num_targets=num_targets, use_cls_token=True,
    )  # fmt: skip


class PatchTSTForecaster(nn.Module):
    """PatchTST (``transformers.PatchTSTForPrediction``) forecasting every input channel; the first D are kept.

    PatchTST is channel-independent: each channel's future comes from that channel's past. With
    ``outputs`` K > 1 (quantiles) its linear head predicts ``K * predict`` steps, read as K sequences.
    """

    def __init__(
        self, input_size: int, target_dim: int, observe: int, predict: int, d_model: int = 32, num_heads: int = 4,
        num_layers: int = 2, patch_length: int = 2, dropout: float = 0.0, outputs: int = 1,
    ) -> None:  # fmt: skip
        super().__init__()
        from transformers import PatchTSTForPrediction

        self.target_dim, self.outputs, self.predict = target_dim, outputs, predict
        self.model = PatchTSTForPrediction(patchtst_config(input_size, observe, predict * outputs, d_model, num_heads, num_layers, patch_length, dropout))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(past_values=inputs).prediction_outputs[..., : self.target_dim]
        return out.view(-1, self.outputs, self.predict, self.target_dim)  # -1, not len(out): an export keeps the batch axis dynamic
