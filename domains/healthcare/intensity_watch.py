"""``predict`` says when the images it scores are unlike every training image in brightness.

The checkpoint holds the training split's per-image mean intensities (the drift reference,
:mod:`pipelines.reference`: ``image.mean``, in [0, 1] by bit depth). An exporter that writes 8-bit
values into 16-bit PNGs makes every image 257 times darker (values / 65535); inverted or wrongly
windowed images move the same way. Such images are scored (the model answers something for any
array), so :class:`IntensityWatch` counts, per ``predict``, the images whose mean intensity lies
outside the training range and warns once at the end, naming the share, the range and examples.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

#: warn when at least this share of the scored images lies outside the training range of mean intensity
OUTSIDE_SHARE = 0.1


class IntensityWatch:
    """Counts the scored images whose mean intensity (before normalisation) is outside the training range."""

    def __init__(self, reference: dict[str, Any] | None, input_name: str = "image") -> None:
        feature = ((reference or {}).get("features") or {}).get(f"{input_name}.mean") or {}
        self.low, self.high = feature.get("min"), feature.get("max")
        self.seen, self.outside, self.examples = 0, 0, []  # examples: (item name, mean intensity)

    @property
    def active(self) -> bool:
        return self.low is not None and self.high is not None

    def update(self, images: torch.Tensor, names: Any) -> None:
        """One batch of images in [0, 1] (``(N, C, ...)``, before normalisation); ``names(position)`` names an image of the batch."""
        if not self.active:
            return
        means = images.detach().flatten(1).double().mean(1).cpu()
        outside = (means < self.low) | (means > self.high)
        self.seen += len(means)
        self.outside += int(outside.sum())
        for position in torch.nonzero(outside).flatten().tolist()[: max(0, 3 - len(self.examples))]:
            self.examples.append((str(names(position)), float(means[position])))

    def note(self) -> str | None:
        """The warning for the images counted so far (``None`` below :data:`OUTSIDE_SHARE`)."""
        if not self.seen or self.outside / self.seen < OUTSIDE_SHARE:
            return None
        shown = ", ".join(f"{name} ({mean:.4f})" for name, mean in self.examples)
        return (
            f"predict: {self.outside} of {self.seen} images ({self.outside / self.seen:.0%}) have a mean intensity outside every training "
            f"image's ({self.low:.4f} to {self.high:.4f} in [0, 1] by bit depth), e.g. {shown}; their predictions are unreliable. "
            "Check the files: 8-bit values stored in 16-bit images read 257 times darker (value / 65535), and inverted or "
            "differently windowed images move the same way"
        )

    def warn(self) -> None:
        note = self.note()
        if note:
            rank_zero_warn(note)
