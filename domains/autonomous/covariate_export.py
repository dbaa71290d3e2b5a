"""The covariate inputs and metadata of an autonomous bundle (:func:`domains.autonomous.exporting.export_spec`).

Beside ``past`` and ``channels`` (the ``channels`` then the future-known channels' past, raw), a
bundle whose model reads covariates takes, in this order, those it needs:

- ``known`` ``(N, predict, K)`` float32: the future-known channels' values at the forecast steps (raw);
- ``codes`` ``(N, T, n)`` int64: each categorical channel's code per observed step, from the
  bundle's ``vocabularies`` (1-based; 0, or any code outside the vocabulary: the unknown category);
- ``group`` ``(N,)`` int64: the row of the per-group statistics, the index of the group's name in
  ``group_names``, or ``len(group_names)`` for the global statistics (an unseen group).

The server (``serving.py``) builds them from named observations; the metadata records the names.
"""

from __future__ import annotations

from typing import Any

import torch


def covariate_inputs(state: dict[str, Any], observe: int, predict: int, time_axis: dict[int, str]) -> tuple[list[str], tuple[torch.Tensor, ...], dict[str, dict[int, str]], dict[str, Any]]:
    """The covariate input names, example tensors (batch 2), dynamic axes and metadata of a checkpoint's data state."""
    names: list[str] = []
    examples: list[torch.Tensor] = []
    known = list(state.get("known_future_channels") or [])
    categorical = list(state.get("categorical_channels") or [])
    groups = state.get("groups")
    if known:
        names.append("known")
        examples.append(torch.randn(2, predict, len(known)))
    if categorical:
        names.append("codes")
        examples.append(torch.ones(2, observe, len(categorical), dtype=torch.long))
    if groups:
        names.append("group")
        examples.append(torch.zeros(2, dtype=torch.long))
    axes = {"known": {0: "batch"}, "codes": {0: "batch", **time_axis}, "group": {0: "batch"}}
    metadata = {
        "known_future_channels": known,
        "categorical_channels": categorical,
        "vocabularies": {c: state["vocabularies"][c] for c in categorical},
        "group_column": groups["column"] if groups else None,
        "group_names": list(groups["names"]) if groups else None,
        "group_normalisation": groups,  # per-group statistics (also inside the graph; the global ones are under "normalisation")
    }
    return names, tuple(examples), {name: axes[name] for name in names}, metadata
