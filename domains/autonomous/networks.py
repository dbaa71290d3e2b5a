"""Plain ``nn.Module`` sequence networks (no Lightning): what gets exported.

All forecasters take ``inputs`` ``(B, observe, F)`` (normalised displacements of the D target
channels first, then the other channels) and return normalised future displacements
``(B, K, predict, D)`` (``K = 1`` for deterministic networks).

- :class:`Seq2SeqForecaster`: LSTM or GRU encoder-decoder; the decoder is autoregressive on its own
  displacement, or on the true one with probability ``teacher_forcing`` (scheduled by the caller).
- :class:`CVAEForecaster`: a conditional VAE (Trajectron/DESIRE style): a recurrent encoder of the
  past, a recognition network ``q(z | past, future)`` used in training, a learned prior
  ``p(z | past)`` sampled at inference, and the same recurrent decoder conditioned on ``z``; K
  samples give K futures (evaluated best-of-K).
- :class:`MixtureForecaster`: K trajectory modes with probabilities (MultiPath-style mixture), trained
  winner-takes-all; its K most probable modes are the K futures.
- :class:`PatchTSTForecaster` (:mod:`domains.autonomous.patchtst`): Hugging Face ``transformers``' PatchTST
  built from a config object (random initialisation; nothing is downloaded).
- :class:`SequenceRegressor`: an RNN (or PatchTST) encoder with an MLP head, for per-window
  regression (1 output) and classification (logits).

Example:
    >>> net = Seq2SeqForecaster(input_size=6, target_dim=2, predict=12)
    >>> net(torch.zeros(3, 8, 6)).shape
    torch.Size([3, 1, 12, 2])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from domains.autonomous.categorical import CategoricalEmbedding
from domains.autonomous.group_scaling import SCALED, scaling_tables, window_scaling
from domains.autonomous.patchtst import PatchTSTForecaster, patchtst_config

__all__ = ["CVAEForecaster", "InferenceSequenceModel", "MixtureForecaster", "PatchTSTForecaster", "Seq2SeqForecaster", "SequenceRegressor"]

Cell = Literal["lstm", "gru"]


def _rnn(cell: Cell, input_size: int, hidden_size: int, num_layers: int, dropout: float) -> nn.RNNBase:
    if cell not in ("lstm", "gru"):
        raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
    kind = nn.LSTM if cell == "lstm" else nn.GRU
    return kind(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)


def _last_hidden(state: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The top layer's final hidden state ``(B, H)`` of an LSTM or GRU state."""
    return (state[0] if isinstance(state, tuple) else state)[-1]


class SequenceEncoder(nn.Module):
    """Embed each step with a small MLP (categorical codes, the last ``len(categories)`` input columns, through
    ``nn.Embedding``: :mod:`domains.autonomous.categorical`), run an LSTM/GRU, return its state."""

    def __init__(
        self, input_size: int, hidden_size: int, embed_size: int, num_layers: int, cell: Cell, dropout: float, categories: tuple[int, ...] = ()
    ) -> None:  # fmt: skip
        super().__init__()
        self.categorical = CategoricalEmbedding(categories)
        self.embed = nn.Sequential(nn.Linear(self.categorical.output_size(input_size), embed_size), nn.ReLU())
        self.rnn = _rnn(cell, embed_size, hidden_size, num_layers, dropout)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        _, state = self.rnn(self.embed(self.categorical(inputs)))
        return state


class RecurrentDecoder(nn.Module):
    """Autoregressive decoder of displacements: input = embedding of the previous displacement (+ a context)."""

    def __init__(
        self, target_dim: int, hidden_size: int, embed_size: int, num_layers: int, cell: Cell, dropout: float, context_size: int = 0,
        outputs: int = 1, feedback: int = 0, known_size: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.target_dim, self.outputs, self.feedback = target_dim, outputs, feedback
        self.embed = nn.Sequential(nn.Linear(target_dim, embed_size), nn.ReLU())
        self.rnn = _rnn(cell, embed_size + context_size + known_size, hidden_size, num_layers, dropout)
        self.out = nn.Linear(hidden_size, target_dim * outputs)

    def forward(
        self,
        state: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        last: torch.Tensor,
        steps: int,
        context: torch.Tensor | None = None,
        truth: torch.Tensor | None = None,
        teacher_forcing: float = 0.0,
        known: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode ``steps`` displacements ``(B, steps, D)`` starting from the last observed one ``(B, D)``;
        with ``outputs`` > 1 (quantiles) ``(B, steps, outputs, D)``, the ``feedback``-th fed back. ``known``
        ``(B, steps, K)``: the future-known covariates, step ``t``'s fed with step ``t``."""
        outputs, previous = [], last
        for t in range(steps):
            step_input = self.embed(previous)
            if context is not None:
                step_input = torch.cat([step_input, context], -1)
            if known is not None:
                step_input = torch.cat([step_input, known[:, t]], -1)
            out, state = self.rnn(step_input[:, None], state)
            displacement = self.out(out[:, 0])
            if self.outputs > 1:
                displacement = displacement.view(-1, self.outputs, self.target_dim)
            outputs.append(displacement)
            previous = displacement[:, self.feedback] if self.outputs > 1 else displacement
            if truth is not None and teacher_forcing > 0 and self.training:
                use_truth = (torch.rand(len(last), 1, device=last.device) < teacher_forcing).to(last.dtype)
                previous = use_truth * truth[:, t] + (1 - use_truth) * previous
        return torch.stack(outputs, 1)


class Seq2SeqForecaster(nn.Module):
    """LSTM/GRU encoder-decoder forecasting displacements.

    Args:
        input_size: features per observed step (F).
        target_dim: forecast channels (D), the first D input features.
        predict: future steps.
        hidden_size: RNN width.
        embed_size: per-step embedding width.
        num_layers: stacked RNN layers.
        cell: ``lstm`` or ``gru``.
        dropout: between stacked layers.
        outputs: sequences per window (K): 1, or one per quantile level (``(B, K, predict, D)``).
        feedback: the output sequence fed back to the decoder when ``outputs`` > 1 (the median).
        categories: codes per categorical channel (the last input columns; embedded).
        known_size: future-known covariates fed to the decoder at each future step (``known`` ``(B, predict, K)``).
    """

    def __init__(
        self, input_size: int, target_dim: int, predict: int, hidden_size: int = 64, embed_size: int = 32, num_layers: int = 1,
        cell: Cell = "lstm", dropout: float = 0.0, outputs: int = 1, feedback: int = 0, categories: tuple[int, ...] = (), known_size: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.target_dim, self.predict = target_dim, predict
        self.encoder = SequenceEncoder(input_size, hidden_size, embed_size, num_layers, cell, dropout, categories)
        self.decoder = RecurrentDecoder(target_dim, hidden_size, embed_size, num_layers, cell, dropout, outputs=outputs, feedback=feedback, known_size=known_size)

    def forward(
        self, inputs: torch.Tensor, truth: torch.Tensor | None = None, teacher_forcing: float = 0.0, known: torch.Tensor | None = None
    ) -> torch.Tensor:  # fmt: skip
        state = self.encoder(inputs)
        last = inputs[:, -1, : self.target_dim]
        out = self.decoder(state, last, self.predict, truth=truth, teacher_forcing=teacher_forcing, known=known)
        return out.transpose(1, 2) if out.ndim == 4 else out[:, None]


class CVAEForecaster(nn.Module):
    """Conditional VAE forecaster: K samples of ``z ~ p(z | past)`` give K futures.

    Args:
        input_size: features per observed step.
        target_dim: forecast channels, the first input features.
        predict: future steps.
        hidden_size: RNN width.
        embed_size: per-step embedding width.
        latent_size: size of ``z``.
        num_layers: stacked RNN layers.
        cell: ``lstm`` or ``gru``.
        dropout: between stacked layers.
        categories, known_size: as :class:`Seq2SeqForecaster`'s.
    """

    def __init__(
        self, input_size: int, target_dim: int, predict: int, hidden_size: int = 64, embed_size: int = 32, latent_size: int = 16,
        num_layers: int = 1, cell: Cell = "lstm", dropout: float = 0.0, categories: tuple[int, ...] = (), known_size: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.target_dim, self.predict, self.latent_size, self.cell = target_dim, predict, latent_size, cell
        self.encoder = SequenceEncoder(input_size, hidden_size, embed_size, num_layers, cell, dropout, categories)
        self.future_encoder = SequenceEncoder(target_dim, hidden_size, embed_size, 1, "gru", 0.0)
        self.prior = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 2 * latent_size))
        self.posterior = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 2 * latent_size))
        self.init_state = nn.Linear(hidden_size + latent_size, hidden_size * num_layers)
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.decoder = RecurrentDecoder(target_dim, hidden_size, embed_size, num_layers, cell, dropout, context_size=latent_size, known_size=known_size)

    def _decode(
        self, h: torch.Tensor, z: torch.Tensor, last: torch.Tensor, truth: torch.Tensor | None, teacher_forcing: float, known: torch.Tensor | None = None
    ) -> torch.Tensor:  # fmt: skip
        hidden = torch.tanh(self.init_state(torch.cat([h, z], -1))).view(-1, self.num_layers, self.hidden_size).transpose(0, 1).contiguous()
        state = (hidden, torch.zeros_like(hidden)) if self.cell == "lstm" else hidden
        return self.decoder(state, last, self.predict, context=z, truth=truth, teacher_forcing=teacher_forcing, known=known)

    def distributions(self, inputs: torch.Tensor, future: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Past encoding ``h`` and the prior (and, given the future displacements, posterior) parameters."""
        h = _last_hidden(self.encoder(inputs))
        out = dict(zip(("prior_mu", "prior_logvar"), self.prior(h).chunk(2, -1)))
        out["h"] = h
        if future is not None:
            hf = _last_hidden(self.future_encoder(future))
            out.update(zip(("post_mu", "post_logvar"), self.posterior(torch.cat([h, hf], -1)).chunk(2, -1)))
        return out

    def forward(
        self, inputs: torch.Tensor, num_samples: int = 1, truth: torch.Tensor | None = None, teacher_forcing: float = 0.0, mean: bool = False,
        known: torch.Tensor | None = None, noise: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``num_samples`` futures from the prior ``(B, K, predict, D)``; ``mean=True`` decodes the prior mean once.
        ``noise``: the standard-normal draws of the codes ``(B, K, latent)`` (evaluation: drawn per sample), else drawn here."""
        d = self.distributions(inputs)
        last = inputs[:, -1, : self.target_dim]
        if mean:
            return self._decode(d["h"], d["prior_mu"], last, None, 0.0, known)[:, None]
        k = num_samples
        mu, std = d["prior_mu"].repeat_interleave(k, 0), (0.5 * d["prior_logvar"]).exp().repeat_interleave(k, 0)
        z = mu + std * (torch.randn_like(std) if noise is None else noise.reshape(std.shape))
        repeated = known.repeat_interleave(k, 0) if known is not None else None
        out = self._decode(d["h"].repeat_interleave(k, 0), z, last.repeat_interleave(k, 0), None, 0.0, repeated)
        return out.view(-1, k, self.predict, self.target_dim)  # -1, not len(inputs): an export keeps the batch axis dynamic

    def training_forward(
        self, inputs: torch.Tensor, future: torch.Tensor, teacher_forcing: float = 0.0, known: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Reconstruction through the posterior ``(B, 1, predict, D)`` and KL(q || p) per sample ``(B,)`` (``noise``: the
        code's standard-normal draw ``(B, latent)``, given at evaluation; else drawn here)."""
        d = self.distributions(inputs, future)
        std = (0.5 * d["post_logvar"]).exp()
        z = d["post_mu"] + std * (torch.randn_like(std) if noise is None else noise)
        recon = self._decode(d["h"], z, inputs[:, -1, : self.target_dim], future, teacher_forcing, known)
        kl = 0.5 * (
            d["prior_logvar"] - d["post_logvar"]
            + (d["post_logvar"].exp() + (d["post_mu"] - d["prior_mu"]) ** 2) / d["prior_logvar"].exp() - 1
        ).sum(-1)  # fmt: skip
        return recon[:, None], kl


class MixtureForecaster(nn.Module):
    """A mixture (multi-modal) forecaster in the MultiPath style: ``modes`` trajectories with probabilities.

    The past is encoded by an LSTM/GRU; one MLP head gives every mode's displacements at once and
    another the modes' logits. Trained by winner-takes-all (the mode closest to the truth is
    regressed, the others slightly, and the classifier learns which mode won), it is a mixture of
    equal-variance Gaussians evaluated at its means. ``forward`` returns the ``num_samples`` most
    probable modes; beyond ``modes``, further futures are drawn from the mixture (a mode picked by
    its probability plus Gaussian noise of the residual spread ``sigma``).

    Args:
        input_size: features per observed step.
        target_dim: forecast channels, the first input features.
        predict: future steps.
        hidden_size: RNN width.
        embed_size: per-step embedding width.
        num_layers: stacked RNN layers.
        cell: ``lstm`` or ``gru``.
        dropout: between stacked layers.
        modes: mixture components.
        sigma: standard deviation of the noise added to drawn futures beyond ``modes`` (normalised units).
        categories: as :class:`Seq2SeqForecaster`'s.
        known_size: future-known covariates: all ``predict`` steps of them join the encoding before the heads.
    """

    def __init__(
        self, input_size: int, target_dim: int, predict: int, hidden_size: int = 64, embed_size: int = 32, num_layers: int = 1,
        cell: Cell = "lstm", dropout: float = 0.0, modes: int = 20, sigma: float = 0.1, categories: tuple[int, ...] = (), known_size: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.target_dim, self.predict, self.modes, self.sigma = target_dim, predict, modes, sigma
        self.encoder = SequenceEncoder(input_size, hidden_size, embed_size, num_layers, cell, dropout, categories)
        self.trunk = nn.Sequential(nn.Linear(hidden_size + predict * known_size, 2 * hidden_size), nn.ReLU())
        self.means = nn.Linear(2 * hidden_size, modes * predict * target_dim)
        self.logits = nn.Linear(2 * hidden_size, modes)

    def mixture(self, inputs: torch.Tensor, known: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every mode's displacements ``(B, M, predict, D)`` and the mode logits ``(B, M)``."""
        encoded = _last_hidden(self.encoder(inputs))
        features = self.trunk(encoded if known is None else torch.cat([encoded, known.flatten(1)], -1))
        return self.means(features).view(-1, self.modes, self.predict, self.target_dim), self.logits(features)

    def forward(
        self, inputs: torch.Tensor, num_samples: int = 1, mean: bool = False, known: torch.Tensor | None = None,
        draws: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``draws``: for the futures beyond ``modes`` (E of them), uniform ``(B, E)`` draws picking their modes and
        standard-normal ``(B, E, predict, D)`` noise (evaluation: drawn per sample), else drawn here."""
        means, logits = self.mixture(inputs, known)
        order = logits.argsort(-1, descending=True)
        k = 1 if mean else num_samples
        top = means.gather(1, order[:, : min(k, self.modes), None, None].expand(-1, -1, self.predict, self.target_dim))
        if k <= self.modes:
            return top
        if draws is None:
            extra = torch.multinomial(logits.softmax(-1), k - self.modes, replacement=True)
        else:  # the mode whose cumulative probability first exceeds the uniform draw: the same distribution
            extra = torch.searchsorted(logits.softmax(-1).cumsum(-1).contiguous(), draws[0].contiguous()).clamp(max=self.modes - 1)
        drawn = means.gather(1, extra[:, :, None, None].expand(-1, -1, self.predict, self.target_dim))
        return torch.cat([top, drawn + self.sigma * (torch.randn_like(drawn) if draws is None else draws[1])], 1)


class SequenceRegressor(nn.Module):
    """Encoder + MLP head: one vector of ``outputs`` per window (regression value or class logits).

    Args:
        input_size: features per observed step.
        outputs: 1 for regression, the number of classes for classification.
        observe: observed steps (PatchTST only).
        encoder: ``lstm``, ``gru`` or ``patchtst``.
        hidden_size: RNN width (or PatchTST ``d_model``).
        embed_size: per-step embedding width (RNN).
        num_layers: stacked RNN or transformer layers.
        num_heads: attention heads (PatchTST).
        patch_length: PatchTST patch length.
        dropout: dropout in the encoder and the head.
        categories: codes per categorical channel (the last input columns; embedded; RNN encoders only).
    """

    def __init__(
        self, input_size: int, outputs: int, observe: int, encoder: Literal["lstm", "gru", "patchtst"] = "lstm", hidden_size: int = 64,
        embed_size: int = 32, num_layers: int = 1, num_heads: int = 4, patch_length: int = 2, dropout: float = 0.0, categories: tuple[int, ...] = (),
    ) -> None:  # fmt: skip
        super().__init__()
        self.kind = encoder
        if encoder == "patchtst":
            from transformers import PatchTSTModel

            self.encoder: nn.Module = PatchTSTModel(
                patchtst_config(input_size, observe, 1, hidden_size, num_heads, num_layers, patch_length, dropout)
            )
            features = hidden_size * input_size
        else:
            self.encoder = SequenceEncoder(input_size, hidden_size, embed_size, num_layers, encoder, dropout, categories)
            features = hidden_size
        self.head = nn.Sequential(nn.Linear(features, hidden_size), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_size, outputs))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.kind == "patchtst":
            hidden = self.encoder(past_values=inputs).last_hidden_state[:, :, 0]  # (B, channels, d_model): the CLS token
            features = hidden.flatten(1)
        else:
            features = _last_hidden(self.encoder(inputs))
        return self.head(features)


class InferenceSequenceModel(nn.Module):
    """A trained network with its input building and output de-normalisation, for export.

    Inputs are raw, in the data's units: ``past`` target positions ``(N, T, D)`` and ``channels``
    ``(N, T, C)``. Outputs: forecasting -> future positions ``(N, predict, D)`` (the deterministic
    forecast: the CVAE's prior mean or the mixture's most likely mode); regression -> values ``(N,)``;
    classification -> class probabilities ``(N, classes)``. Mirrors the data module's
    ``on_after_batch_transfer`` and the task's ``forward``/``_positions``. A quantile network's
    outputs are sorted (no crossing) and its ``point``-th, the median, is returned; class
    probabilities are ``softmax(logits / temperature)`` (the calibration fitted on validation).
    Covariates follow as further inputs, those named in ``extra_inputs``: ``known`` ``(N, predict, K)``
    future-known values, ``codes`` ``(N, T, n)`` categorical codes (0: unknown), ``group`` ``(N,)`` the
    row of the per-group statistics (the last: global).
    """

    def __init__(
        self, network: nn.Module, task: str, stochastic: bool, velocity_residual: bool, target_dim: int, stats: dict, point: int = 0,
        temperature: float = 1.0, extra_inputs: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        super().__init__()
        self.network, self.point, self.temperature, self.extra_inputs = network, point, float(temperature), extra_inputs
        self.task, self.stochastic, self.velocity_residual, self.target_dim = task, stochastic, velocity_residual, target_dim
        self.canonical_heading = bool(stats.get("canonical_heading", False))
        for key, table in scaling_tables(stats).items():  # one row per group, the global statistics last
            self.register_buffer(key, table)

    def forward(self, past: torch.Tensor, channels: torch.Tensor, *covariates: torch.Tensor) -> torch.Tensor:
        extra = dict(zip(self.extra_inputs, covariates))
        scaling = window_scaling({key: getattr(self, key) for key in SCALED}, extra.get("group"))
        scale = scaling["displacement_scale"][:, None, None]
        steps = torch.cat([torch.zeros_like(past[:, :1]), past[:, 1:] - past[:, :-1]], 1) / scale  # diff, ONNX-safe
        frame = None
        if self.canonical_heading:
            heading = past[:, -1] - past[:, 0]
            angle = torch.atan2(heading[:, 1], heading[:, 0])
            c, s = torch.cos(angle), torch.sin(angle)
            frame = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
            steps = steps @ frame
        mean, std = scaling["channel_mean"], scaling["channel_std"]
        inputs = torch.cat([steps, (channels - mean) / std, *([extra["codes"].to(steps.dtype)] if "codes" in extra else [])], -1)
        if self.task == "regression":
            out = self.network(inputs)
            out = torch.sort(out, 1).values if out.shape[1] > 1 else out
            return out[:, self.point] * scaling["target_std"] + scaling["target_mean"]
        if self.task == "classification":
            return torch.softmax(self.network(inputs) / self.temperature, dim=1)
        known = {"known": (extra["known"] - mean[..., -extra["known"].shape[-1] :]) / std[..., -extra["known"].shape[-1] :]} if "known" in extra else {}
        out = self.network(inputs, mean=True, **known) if self.stochastic else self.network(inputs, **known)
        if self.velocity_residual:
            out = out + inputs[:, -1, : self.target_dim][:, None, None]
        if frame is not None:
            out = out @ frame.transpose(1, 2)[:, None]
        positions = past[:, -1][:, None, None] + torch.cumsum(out * scale[..., None], 2)
        return (torch.sort(positions, 1).values if positions.shape[1] > 1 else positions)[:, self.point]
