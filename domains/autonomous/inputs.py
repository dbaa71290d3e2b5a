"""Model inputs built on the device from a batch of raw windows and the training statistics.

:func:`model_inputs` is the body of ``SensorSequenceDataModule.on_after_batch_transfer``: per-step
displacements of the positions divided by the training split's isotropic scale (in each window's
heading frame with ``canonical_heading``), z-scored channels, the categorical codes (as the last
columns; :mod:`domains.autonomous.categorical`), the future-known covariates' future values z-scored
like their past (``known``), and the target's training mean and std. With per-group normalisation
each window takes its group's statistics (:mod:`domains.autonomous.group_scaling`). Exported models
rebuild the same inputs (``model.py`` ``export_spec``).
"""

from __future__ import annotations

from typing import Any

import torch

from domains.autonomous.categorical import UNKNOWN_DROPOUT
from domains.autonomous.group_scaling import scaling_tables, window_scaling


def model_inputs(batch: dict[str, Any], stats: dict[str, Any], canonical_heading: bool, rotate: bool, training: bool = False) -> dict[str, Any]:
    """Add ``inputs`` (B, observe, F), ``displacement_scale``, ``target_mean`` and ``target_std`` (B,), ``known``
    normalised (B, predict, K), and with ``canonical_heading`` the per-window ``frame`` (B, 2, 2) that the
    model uses to rotate its displacements back to the data's frame. ``past``/``future`` stay in the
    data's frame, except that ``rotate`` (training augmentation) turns each window by a random angle.
    ``training``: a few categorical codes become the unknown category (``UNKNOWN_DROPOUT``).
    """
    past, channels = batch["past"], batch["channels"]
    future = batch.get("future")
    if rotate:
        angle = torch.rand(len(past), device=past.device, dtype=past.dtype) * (2 * torch.pi)
        c, s = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (B, 2, 2)
        origin = past[:, -1:]
        past = (past - origin) @ rotation.transpose(1, 2) + origin
        batch["past"] = past
        if future is not None:
            batch["future"] = (future - origin) @ rotation.transpose(1, 2) + origin
    tables = {key: table.to(past.device, past.dtype) for key, table in scaling_tables(stats).items()}
    scaling = window_scaling(tables, batch.get("group"))
    scale = scaling["displacement_scale"].expand(len(past))
    steps = torch.diff(past, dim=1, prepend=past[:, :1]) / scale[:, None, None]
    if canonical_heading:
        heading = past[:, -1] - past[:, 0]
        angle = torch.atan2(heading[:, 1], heading[:, 0])
        c, s = torch.cos(angle), torch.sin(angle)
        frame = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (B, 2, 2)
        batch["frame"] = frame  # canonical = world @ frame; world = canonical @ frame.T
        steps = steps @ frame
    mean, std = scaling["channel_mean"], scaling["channel_std"]
    parts = [steps, (channels - mean) / std]
    if "codes" in batch:
        codes = batch["codes"]
        if training:
            codes = codes.masked_fill(torch.rand(codes.shape, device=codes.device) < UNKNOWN_DROPOUT, 0)
        parts.append(codes.to(past.dtype))
    batch["inputs"] = torch.cat(parts, -1)
    if "known" in batch:  # the future-known channels are the last channels: z-scored with their statistics
        k = batch["known"].shape[-1]
        batch["known"] = (batch["known"] - mean[..., -k:]) / std[..., -k:]
    batch["displacement_scale"] = scale
    batch["target_mean"] = scaling["target_mean"].expand(len(past))
    batch["target_std"] = scaling["target_std"].expand(len(past))
    return batch

