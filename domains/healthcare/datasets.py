"""Training items of the healthcare data: :class:`ImageDataset` (images as float tensors in [0, 1],
augmented on the fly) and the MONAI augmentation of 3-D volumes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def build_volume_augmentation() -> Any:
    """Random flips on every axis and mild noise for 3-D volumes (MONAI transforms)."""
    from monai.transforms import Compose, RandFlip, RandGaussianNoise

    return Compose([RandFlip(prob=0.5, spatial_axis=axis) for axis in range(3)] + [RandGaussianNoise(prob=0.3, std=0.02)])


class ImageDataset(Dataset):
    """Items ``{"image": float32 (C, *spatial) in [0, 1], "label": ..., "index": int}`` as plain tensors."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, augment: Any = None, volume: bool = False) -> None:
        self.images, self.labels, self.indices = images, labels, indices
        self.augment, self.volume = augment, volume

    def __len__(self) -> int:
        return len(self.images)

    def _augmented(self, image: np.ndarray) -> np.ndarray:
        if self.volume:
            return np.asarray(self.augment(image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image))
        hwc = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
        out = self.augment(image=hwc)["image"]
        return out[None] if out.ndim == 2 else np.moveaxis(out, -1, 0)

    def __getitem__(self, item: int) -> dict[str, Any]:
        image = self.images[item]
        if self.augment is not None:
            image = self._augmented(image)
        tensor = torch.from_numpy(np.ascontiguousarray(image))
        tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
        return {"image": tensor, "label": torch.as_tensor(self.labels[item]), "index": int(self.indices[item])}
