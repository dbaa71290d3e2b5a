"""Categorical channels (``--data.categorical_channels``): a vocabulary fitted on the training split, an
unknown-category bucket, and the ``nn.Embedding`` of the codes inside the plain torch networks.

A categorical channel holds text (or numbers used as names: ``road_type`` = ``urban``, ``gear`` =
``3``). Its **vocabulary** is the sorted set of values in the training split's rows; it is saved in
the checkpoint (the data module's state, ``vocabularies``) and in exported bundles. Each value is
encoded as its 1-based index in the vocabulary; **0 is the unknown bucket**: a value met at
val/test/predict time (or in a served request) that is not in the vocabulary, a label typo say. The
rule is one: such a value is *counted and warned about, never refused*: the log names the split, the
column, each unknown value with its count and the closest known value (``'urbna' (3 rows; closest
known: 'urban')``), and a served answer lists them under ``unknown_categories``. So that the unknown
bucket means something, ``UNKNOWN_DROPOUT`` of the training codes are replaced by 0 at random (the
model learns what to do without the category), like word dropout.

Codes travel as the last columns of the model's ``inputs`` (as float values of small integers, exact
in float32); :class:`CategoricalEmbedding` splits them off and replaces them by their embeddings
(``nn.Embedding``, one per channel, of :func:`embedding_size` width, pytorch-forecasting's rule), so
that occluding a code (setting it to 0, :mod:`domains.autonomous.attributions`) means "unknown".

Example:
    >>> vocabulary = fit_vocabulary(np.array(["urban", "rural", "urban"]))
    >>> vocabulary, encode(np.array(["rural", "urbna"]), vocabulary)[0].tolist()
    (['rural', 'urban'], [1, 0])
"""

from __future__ import annotations

import difflib
from collections import Counter

import numpy as np
import torch
from torch import nn

#: share of training codes replaced by the unknown bucket (0), so that its embedding is trained
UNKNOWN_DROPOUT = 0.02


def category_text(value: object) -> str:
    """A category as text: numbers that are whole (``3``, ``3.0``) read as ``"3"`` in a table and in a JSON request alike."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def fit_vocabulary(values: np.ndarray) -> list[str]:
    """The sorted distinct values (as text) of one channel's training rows."""
    return sorted({category_text(v) for v in values})


def encode(values: np.ndarray, vocabulary: list[str]) -> tuple[np.ndarray, Counter]:
    """1-based codes of ``values`` (0: not in ``vocabulary``) and the count of each unknown value."""
    index = {name: i + 1 for i, name in enumerate(vocabulary)}
    texts = [category_text(v) for v in values]
    codes = np.array([index.get(t, 0) for t in texts], dtype=np.int64)
    return codes, Counter(t for t, c in zip(texts, codes) if c == 0)


def describe_unknown(column: str, unknown: Counter, vocabulary: list[str], limit: int = 5) -> str:
    """``column 'road': 'urbna' (3 rows; closest known: 'urban'), ...`` for a warning or an answer."""
    parts = []
    for value, count in unknown.most_common(limit):
        close = difflib.get_close_matches(value, vocabulary, n=1, cutoff=0.6)
        parts.append(f"{value!r} ({count} row{'s' if count != 1 else ''}" + (f"; closest known: {close[0]!r})" if close else ")"))
    more = f" and {len(unknown) - limit} more value(s)" if len(unknown) > limit else ""
    return f"column {column!r}: " + ", ".join(parts) + more


def embedding_size(cardinality: int) -> int:
    """Embedding width of a channel with ``cardinality`` codes (pytorch-forecasting's rule: ``round(1.6 n^0.56)``, at most 16)."""
    return int(min(16, max(1, round(1.6 * cardinality**0.56))))


class CategoricalEmbedding(nn.Module):
    """Replace the last ``len(cardinalities)`` columns of ``(B, T, F)`` inputs (codes) by their embeddings.

    Args:
        cardinalities: codes per channel, the unknown bucket 0 included (``len(vocabulary) + 1``).

    ``output_size(F)`` is the width after embedding. With no categorical channel it is the identity.
    """

    def __init__(self, cardinalities: list[int] | tuple[int, ...] = ()) -> None:
        super().__init__()
        self.count = len(cardinalities)
        self.embeddings = nn.ModuleList(nn.Embedding(int(n), embedding_size(int(n))) for n in cardinalities)

    def output_size(self, input_size: int) -> int:
        return input_size - self.count + sum(e.embedding_dim for e in self.embeddings)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.count:
            return inputs
        values, codes = inputs[..., : -self.count], inputs[..., -self.count :].round().long()
        embedded = []
        for i, embedding in enumerate(self.embeddings):  # a code outside the vocabulary (a raw bundle input) is the unknown bucket
            code = codes[..., i]
            embedded.append(embedding(torch.where((code < 0) | (code >= embedding.num_embeddings), torch.zeros_like(code), code)))
        return torch.cat([values, *embedded], -1)
