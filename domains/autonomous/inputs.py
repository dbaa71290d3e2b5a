"""Model inputs built on the device from a batch of raw windows and the training statistics.

:func:`model_inputs` is the body of ``SensorSequenceDataModule.on_after_batch_transfer``: per-step
displacements of the positions divided by the training split's isotropic scale (in each window's
heading frame with ``canonical_heading``), z-scored channels, and for regression the target's
training mean and std. Exported models rebuild the same inputs (``model.py`` ``export_spec``).
"""

from __future__ import annotations

from typing import Any

import torch


def model_inputs(batch: dict[str, Any], stats: dict[str, Any], canonical_heading: bool, rotate: bool) -> dict[str, Any]:
    """Add ``inputs`` (B, observe, F), ``displacement_scale`` (B,), for regression ``target_mean`` and
    ``target_std`` (B,), and with ``canonical_heading`` the per-window ``frame`` (B, 2, 2) that the
    model uses to rotate its displacements back to the data's frame. ``past``/``future`` stay in the
    data's frame, except that ``rotate`` (training augmentation) turns each window by a random angle.
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
    scale = float(stats["displacement_scale"])
    steps = torch.diff(past, dim=1, prepend=past[:, :1]) / scale
    if canonical_heading:
        heading = past[:, -1] - past[:, 0]
        angle = torch.atan2(heading[:, 1], heading[:, 0])
        c, s = torch.cos(angle), torch.sin(angle)
        frame = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (B, 2, 2)
        batch["frame"] = frame  # canonical = world @ frame; world = canonical @ frame.T
        steps = steps @ frame
    mean = torch.tensor(stats["channel_mean"], device=past.device, dtype=past.dtype)
    std = torch.tensor(stats["channel_std"], device=past.device, dtype=past.dtype)
    batch["inputs"] = torch.cat([steps, (channels - mean) / std], -1)
    batch["displacement_scale"] = torch.full((len(past),), scale, device=past.device, dtype=past.dtype)
    if "target" in batch:
        batch["target_mean"] = torch.full_like(batch["target"], float(stats["target_mean"]))
        batch["target_std"] = torch.full_like(batch["target"], float(stats["target_std"]))
    return batch

