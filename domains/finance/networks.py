"""Plain ``nn.Module`` autoencoders for tabular rows (no Lightning): what gets exported.

Inputs are ``numeric`` (float, N x F: standardised numbers, booleans, time on the circle, one-hot
categoricals) and ``categorical`` (int64, N x C: vocabulary indices for embedded categoricals,
index 0 = unknown). The decoder reconstructs the numeric features and, for each embedded
categorical, logits over its vocabulary.

The anomaly score of a row is its negative log-likelihood under the model, split per feature:
``0.5 * (x - x_hat)^2`` per numeric feature (a unit-variance Gaussian), cross-entropy per embedded
categorical and, for the VAE, the KL divergence of the posterior from the prior, so that the VAE
score is the negative ELBO (with the posterior mean as the code, which makes scores deterministic).
:func:`group_contributions` sums feature errors into the analyst's source columns.

Example:
    >>> net = TabularAutoencoder(num_numeric=5, categorical_cardinalities=[4], hidden_dims=[16], latent_dim=2, variational=True)
    >>> errors = net.errors(torch.zeros(3, 5), torch.zeros(3, 1, dtype=torch.long))
    >>> errors.numeric.shape, errors.categorical.shape, errors.kl.shape
    (torch.Size([3, 5]), torch.Size([3, 1]), torch.Size([3]))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


def mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers with GELU (and optional dropout) between them; the last layer is linear."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class RowErrors(NamedTuple):
    """Per-row reconstruction terms: ``numeric`` (N x F), ``categorical`` (N x C), ``kl`` (N)."""

    numeric: torch.Tensor
    categorical: torch.Tensor
    kl: torch.Tensor


class TabularAutoencoder(nn.Module):
    """A dense autoencoder, or a variational one (``variational=True``), for mixed tabular rows.

    Args:
        num_numeric: numeric input features.
        categorical_cardinalities: vocabulary size of each embedded categorical column.
        hidden_dims: widths of the encoder's hidden layers (the decoder mirrors them).
        latent_dim: size of the code.
        embedding_dim: embedding width per categorical column.
        dropout: dropout after each hidden layer.
        variational: encode to a Gaussian posterior (mean, log-variance) and sample during training.
    """

    def __init__(
        self,
        num_numeric: int,
        categorical_cardinalities: list[int] | tuple[int, ...] = (),
        hidden_dims: list[int] | tuple[int, ...] = (64, 32),
        latent_dim: int = 8,
        embedding_dim: int = 4,
        dropout: float = 0.0,
        variational: bool = False,
    ) -> None:
        super().__init__()
        if num_numeric + len(categorical_cardinalities) == 0:
            raise ValueError("the autoencoder needs at least one input feature")
        if latent_dim < 1 or any(h < 1 for h in hidden_dims):
            raise ValueError(f"latent_dim and hidden_dims must be positive, got {latent_dim} and {list(hidden_dims)}")
        self.num_numeric = num_numeric
        self.cardinalities = [int(c) for c in categorical_cardinalities]
        self.variational = variational
        self.embeddings = nn.ModuleList(nn.Embedding(c, embedding_dim) for c in self.cardinalities)
        width = num_numeric + embedding_dim * len(self.cardinalities)
        hidden = [int(h) for h in hidden_dims]
        self.encoder = mlp([width, *hidden, latent_dim * (2 if variational else 1)], dropout)
        self.decoder = mlp([latent_dim, *hidden[::-1], num_numeric + sum(self.cardinalities)], dropout)

    def encode(self, numeric: torch.Tensor, categorical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The code (mean) and, for the VAE, the posterior log-variance."""
        inputs = [numeric] + [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        hidden = self.encoder(torch.cat(inputs, 1))
        if not self.variational:
            return hidden, None
        mean, log_var = hidden.chunk(2, 1)
        return mean, log_var.clamp(-12.0, 12.0)

    def decode(self, code: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Reconstructed numeric features and logits for each embedded categorical."""
        out = self.decoder(code)
        numeric, rest = out[:, : self.num_numeric], out[:, self.num_numeric :]
        return numeric, list(rest.split(self.cardinalities, 1)) if self.cardinalities else []

    def errors(self, numeric: torch.Tensor, categorical: torch.Tensor, sample: bool = False) -> RowErrors:
        """Per-row, per-feature negative log-likelihood terms; ``sample`` draws the VAE code (training)."""
        mean, log_var = self.encode(numeric, categorical)
        code = mean
        if log_var is not None and sample:
            code = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var)
        recon, logits = self.decode(code)
        numeric_error = 0.5 * (recon - numeric) ** 2
        if logits:
            categorical_error = torch.stack([F.cross_entropy(lg, categorical[:, i], reduction="none") for i, lg in enumerate(logits)], 1)
        else:
            categorical_error = numeric.new_zeros(len(numeric), 0)
        if log_var is None:
            kl = numeric.new_zeros(len(numeric))
        else:
            kl = 0.5 * (mean**2 + log_var.exp() - 1.0 - log_var).sum(1)
        return RowErrors(numeric_error, categorical_error, kl)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        """The anomaly score of each row (deterministic): reconstruction NLL (+ KL for the VAE)."""
        e = self.errors(numeric, categorical)
        return e.numeric.sum(1) + e.categorical.sum(1) + e.kl


def group_contributions(errors: RowErrors, numeric_groups: torch.Tensor, categorical_groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum per-feature errors into source-column groups: (N x ``num_groups``)."""
    out = errors.numeric.new_zeros(len(errors.numeric), num_groups)
    if errors.numeric.shape[1]:
        out.index_add_(1, numeric_groups, errors.numeric)
    if errors.categorical.shape[1]:
        out.index_add_(1, categorical_groups, errors.categorical)
    return out


def group_matrix(groups: list[int] | torch.Tensor, num_groups: int) -> torch.Tensor:
    """A 0/1 float32 matrix (features x ``num_groups``) that sums feature errors into their groups."""
    index = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
    matrix = torch.zeros(len(index), num_groups, dtype=torch.float32)
    if len(index):
        matrix[torch.arange(len(index)), index] = 1.0
    return matrix


def score_rows(
    network: TabularAutoencoder, numeric: torch.Tensor, categorical: torch.Tensor | None, numeric_groups: torch.Tensor, categorical_groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic anomaly score per row (N) and its per-group contributions (N x G).

    The one scoring function of the domain: validation, test, ``predict`` and the exported
    :class:`FraudScorer` all call it. The code is the posterior mean (the VAE's score is its negative
    ELBO at the mean, so scores never depend on a random draw); per-feature errors are summed into
    groups with the 0/1 matrices of :func:`group_matrix` (a matrix product: traceable, with a dynamic
    batch axis). ``categorical`` may be ``None`` when the network embeds no categorical column.
    """
    mean, log_var = network.encode(numeric, categorical)  # type: ignore[arg-type]  # unused without embeddings
    recon, logits = network.decode(mean)
    contributions = (0.5 * (recon - numeric) ** 2) @ numeric_groups
    if logits:
        assert categorical is not None, "the network embeds categorical columns: pass their indices"
        nll = torch.stack([-torch.log_softmax(lg, 1).gather(1, categorical[:, i : i + 1]).squeeze(1) for i, lg in enumerate(logits)], 1)
        contributions = contributions + nll @ categorical_groups
    score = contributions.sum(1)
    if log_var is not None:
        score = score + 0.5 * (mean**2 + log_var.exp() - 1.0 - log_var).sum(1)
    return score, contributions


class FraudScorer(nn.Module):
    """The network with its scoring and alert rule, for export: preprocessed rows -> score, alert, contributions.

    Inputs: ``numeric`` (float32, N x F: the preprocessed feature matrix) and, only when the network
    embeds categorical columns, ``categorical`` (int64, N x C: vocabulary indices; an index outside a
    column's vocabulary is read as 0, the ``<unknown>`` slot). Outputs: ``score`` (float32, N),
    ``is_alert`` (int64 0/1, N: ``score >= threshold``, compared in float64 like the checkpoint) and
    ``contributions`` (float32, N x G: the score split per source-column group; the VAE's KL term is
    in the score only).

    Example:
        >>> net = TabularAutoencoder(num_numeric=3, hidden_dims=[8], latent_dim=2)
        >>> scorer = FraudScorer(net, group_matrix([0, 0, 1], 2), group_matrix([], 0), threshold=0.5)
        >>> [tuple(t.shape) for t in scorer(torch.zeros(4, 3))]
        [(4,), (4,), (4, 2)]
    """

    def __init__(self, network: TabularAutoencoder, numeric_groups: torch.Tensor, categorical_groups: torch.Tensor, threshold: float) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("numeric_groups", numeric_groups.float())
        self.register_buffer("categorical_groups", categorical_groups.float())
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float64))
        self.register_buffer("cardinalities", torch.tensor(network.cardinalities, dtype=torch.long))

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if categorical is not None:
            categorical = torch.where((categorical < 0) | (categorical >= self.cardinalities), torch.zeros_like(categorical), categorical)
        score, contributions = score_rows(self.network, numeric, categorical, self.numeric_groups, self.categorical_groups)
        is_alert = (score.double() >= self.threshold).long()
        return score, is_alert, contributions
