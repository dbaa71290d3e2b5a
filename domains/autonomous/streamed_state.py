"""The statistics of :func:`domains.autonomous.fitted_state.fit_input_statistics` and the drift reference, fitted
in bounded passes over a memory-mapped training split (``--data.streaming true``).

- channel means and spreads over the rows observed by some training window: blocks of whole segments,
  each block's covered rows found from its window starts, combined with Chan's parallel formula in
  float64 (the in-memory path sums the float32 channels pairwise: the two agree to float32 precision,
  ~1e-7 relative, not bit for bit);
- the displacement scale: the RMS step length within segments, block by block;
- the regression target's mean and spread at each window's last observed row;
- the drift reference (:func:`pipelines.reference.fit_sequence_reference`): each window's mean per
  channel, computed block by block from the same window tensors (bit for bit the in-memory values); the
  per-window means (8 bytes per window and channel) are held for the quantiles.

The mapped pages read by each block are handed back to the page cache after it (they would otherwise count in the
process's resident memory until the kernel needs them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from pipelines.cache_folders import release
from pipelines.reference import fit_sequence_reference
from domains.autonomous.readers import Tracks
from domains.autonomous.windows import Windows, WindowStarts

#: windows (or segments) per block of a pass
BLOCK = 65536


class Moments:
    """Count, mean and sum of squared deviations of columns, combined block by block (Chan et al.) in float64."""

    def __init__(self, width: int) -> None:
        self.count, self.mean, self.m2 = 0, np.zeros(width), np.zeros(width)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
        n = len(values)
        if n == 0:
            return
        mean = values.mean(0)
        m2 = ((values - mean) ** 2).sum(0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


def segment_blocks(windows: WindowStarts, size: int = BLOCK) -> Iterator[tuple[int, int]]:
    """``(first, last)`` window ranges of about ``size`` windows that end where a segment ends (no row is shared
    between two blocks' windows)."""
    first, n = 0, len(windows)
    while first < n:
        last = min(n, first + size)
        while last < n and windows.segment[last] == windows.segment[last - 1]:
            last += 1
        yield first, last
        first = last


def fit_streamed_statistics(tracks: Tracks, windows: WindowStarts, observe: int, target_dim: int, regression: bool, maps: list[Any] = ()) -> dict[str, Any]:
    """:func:`domains.autonomous.fitted_state.fit_input_statistics`'s dictionary, from bounded passes (the pages of ``maps``,
    the split's memory maps, handed back after each block)."""
    channels = Moments(tracks.channels.shape[1])
    labels = Moments(1)
    for first, last in segment_blocks(windows):
        starts = windows.start[first:last]
        low, high = int(starts[0]), int(starts[-1]) + observe
        cover = np.cumsum(np.bincount(starts - low, minlength=high - low + 1) - np.bincount(starts - low + observe, minlength=high - low + 1))
        channels.add(np.asarray(tracks.channels[low:high])[cover[: high - low] > 0])
        if regression:
            labels.add(np.asarray(tracks.label[starts + observe - 1], dtype=np.float64))
        release(maps)
    squares, steps = 0.0, 0
    for first in range(0, len(tracks.starts), BLOCK) if target_dim else ():
        starts, lengths = tracks.starts[first : first + BLOCK], tracks.lengths[first : first + BLOCK]
        low, high = int(starts[0]), int(starts[-1] + lengths[-1])
        same = np.ones(high - low - 1, bool) if high - low > 1 else np.zeros(0, bool)
        same[(starts[1:] - low - 1)] = False  # the step from a segment's last row to the next segment's first
        step = np.diff(np.asarray(tracks.targets[low:high]), axis=0)[same]
        squares, steps = squares + float((step**2).sum()), steps + len(step)
        release(maps)
    scale = float(np.sqrt(squares / steps)) if steps else 1.0
    stats: dict[str, Any] = {
        "channel_mean": channels.mean.astype(np.float32).astype(float).tolist(),
        "channel_std": np.maximum(channels.std.astype(np.float32), 1e-6).astype(float).tolist(),
        "displacement_scale": max(scale, 1e-6),
        "target_mean": 0.0,
        "target_std": 1.0,
    }
    if regression:
        stats["target_mean"], stats["target_std"] = float(labels.mean[0]), float(max(labels.std[0], 1e-6))
    return stats


def streamed_reference(
    tracks: Tracks, windows: WindowStarts, tensors: Callable[[Tracks, Windows, str], dict[str, torch.Tensor]], channel_names: dict[str, list[str]], source: str,
    maps: list[Any] = (),
) -> dict[str, Any]:
    """:func:`pipelines.reference.fit_sequence_reference` of the training windows, their tensors built a block at a time:
    each window's mean over its time steps is what the reference is fitted on, so the means are passed as one-step windows."""
    means: dict[str, list[np.ndarray]] = {name: [] for name in channel_names}
    for first, last in segment_blocks(windows):
        block = tensors(tracks, windows.block(first, last), "train")
        for name in channel_names:
            values = np.asarray(block[name], dtype=np.float64)
            means[name].append(np.stack([values[:, :, j].mean(axis=1) for j in range(values.shape[2])], 1) if values.shape[2] else values[:, 0, :])
        release(maps)
    joined = {name: np.concatenate(parts)[:, None, :] for name, parts in means.items()}
    return fit_sequence_reference(joined, channel_names, source)
