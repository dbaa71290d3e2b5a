"""Which network ``SensorSequenceModel`` trains: ``model.architecture`` and the task, as the model's docstring tabulates.

:func:`make_network` builds it from the model's hyper-parameters (``domains.autonomous.networks``): forecasting
with the LSTM/GRU encoder-decoder (``rnn``), the conditional VAE (``cvae``), the mode mixture (``mixture``) or
PatchTST (``transformer``); regression and classification with an LSTM/GRU or PatchTST encoder and an MLP head.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from domains.autonomous.networks import CVAEForecaster, MixtureForecaster, PatchTSTForecaster, Seq2SeqForecaster, SequenceRegressor


def make_network(hp: Any, outputs: int, point_index: int) -> nn.Module:
    """The network of these hyper-parameters. ``outputs``: values per prediction (the quantiles, else 1);
    ``point_index``: which of them is the point prediction the encoder-decoder feeds back."""
    covariates = {"categories": tuple(hp.get("categories") or ()), "known_size": int(hp.get("known_size") or 0)}
    if hp.task != "forecasting":
        outputs = outputs if hp.task == "regression" else hp.num_classes
        encoder = "patchtst" if hp.architecture == "transformer" else hp.cell
        return SequenceRegressor(hp.input_size, outputs, hp.observe, encoder, hp.hidden_size, hp.embed_size,
                                 hp.num_layers, hp.num_heads, hp.patch_length, hp.dropout, covariates["categories"])  # fmt: skip
    common = {"input_size": hp.input_size, "target_dim": hp.target_dim, "predict": hp.predict}
    if hp.architecture != "transformer":
        common |= covariates
    if hp.architecture == "rnn":
        return Seq2SeqForecaster(**common, hidden_size=hp.hidden_size, embed_size=hp.embed_size, num_layers=hp.num_layers,
                                 cell=hp.cell, dropout=hp.dropout, outputs=outputs, feedback=point_index)  # fmt: skip
    if hp.architecture == "cvae":
        return CVAEForecaster(**common, hidden_size=hp.hidden_size, embed_size=hp.embed_size, latent_size=hp.latent_size,
                              num_layers=hp.num_layers, cell=hp.cell, dropout=hp.dropout)  # fmt: skip
    if hp.architecture == "mixture":
        return MixtureForecaster(**common, hidden_size=hp.hidden_size, embed_size=hp.embed_size, num_layers=hp.num_layers,
                                 cell=hp.cell, dropout=hp.dropout, modes=hp.modes)  # fmt: skip
    return PatchTSTForecaster(**common, observe=hp.observe, d_model=hp.hidden_size, num_heads=hp.num_heads,
                              num_layers=hp.num_layers, patch_length=hp.patch_length, dropout=hp.dropout, outputs=outputs)  # fmt: skip
