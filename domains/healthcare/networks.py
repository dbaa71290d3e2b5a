"""Plain ``nn.Module`` classifiers from MONAI (no Lightning): what gets exported.

Example:
    >>> net = build_network("resnet18", spatial_dims=2, in_channels=1, out_channels=3)
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from monai.networks import nets

NetworkName = Literal["resnet10", "resnet18", "resnet34", "resnet50", "densenet121", "efficientnet-b0"]
_RESNETS = {"resnet10": nets.resnet10, "resnet18": nets.resnet18, "resnet34": nets.resnet34, "resnet50": nets.resnet50}


def build_network(
    name: NetworkName,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    small_input_stem: bool = True,
    dropout: float = 0.0,
    width: float = 1.0,
) -> torch.nn.Module:
    """Build a MONAI classification network.

    Args:
        name: ``resnet10/18/34/50``, ``densenet121`` or ``efficientnet-b0``.
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: input channels.
        out_channels: logits per sample.
        small_input_stem: for ResNets, a 3x3 stride-1 first convolution without max-pooling, as
            MedMNIST's ResNet-18 (28) uses for small images.
        dropout: dropout before the classifier (DenseNet only; ignored elsewhere).
        width: ResNet channel multiplier (MONAI's ``widen_factor``): 0.5 halves every layer's
            channels and quarters the parameters, which suits small data sets and images.

    Raises:
        ValueError: for an unknown name, a width that is not positive, or a width other than 1
            for a network that is not a ResNet.
    """
    if width <= 0 or (width != 1.0 and name not in _RESNETS):
        raise ValueError(f"width {width} for network {name!r}: expected a positive multiplier, and 1.0 unless the network is a ResNet")
    if name in _RESNETS:
        stem = {"conv1_t_size": 3, "conv1_t_stride": 1, "no_max_pool": True} if small_input_stem else {"conv1_t_size": 7, "conv1_t_stride": 2}
        return _RESNETS[name](spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=out_channels, widen_factor=width, **stem)
    if name == "densenet121":
        return nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, dropout_prob=dropout)
    if name == "efficientnet-b0":
        return nets.EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=out_channels)
    raise ValueError(f"network {name!r} is not one of {[*_RESNETS, 'densenet121', 'efficientnet-b0']}")


def min_input_size(name: str, small_input_stem: bool = True) -> int:
    """The smallest side (pixels) the network takes: its total downsampling, so the deepest layer sees
    at least one pixel of the image rather than padding (8 for a small-stem ResNet, else 32).

    Example:
        >>> min_input_size("resnet18"), min_input_size("resnet18", small_input_stem=False), min_input_size("densenet121")
        (8, 32, 32)
    """
    return 8 if name in _RESNETS and small_input_stem else 32


def load_pretrained_weights(network: torch.nn.Module, path: str | Path) -> list[str]:
    """Load a local state dict (``.safetensors``, or a weights-only ``torch.load``) into ``network``.

    Tensors whose name or shape does not match (e.g. a classifier head for other classes) are
    skipped and returned, so the caller can report them. Files are never unpickled as code.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained_weights {path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"pretrained_weights {path}: expected a state dict of tensors")
    own = network.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"pretrained_weights {path}: no tensor matches the network's names and shapes")
    network.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


class InferenceClassifier(torch.nn.Module):
    """Network plus its pre- and post-processing, for export: images in [0, 1] -> class probabilities.

    Binary tasks return ``(N, 2)`` probabilities (negative, positive) so every single-label task
    has one column per class; multi-label tasks return one independent probability per label.
    """

    def __init__(self, network: torch.nn.Module, mean: list[float], std: list[float], task: str, spatial_dims: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("temperature", torch.tensor(float(temperature)))  # fitted on validation (calibration); 1: none
        self.network = network
        shape = (1, -1) + (1,) * spatial_dims
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))
        self.task = task

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.network((image - self.mean) / self.std) / self.temperature
        if self.task == "binary":
            positive = torch.sigmoid(logits[:, :1])
            return torch.cat([1 - positive, positive], dim=1)
        return torch.softmax(logits, dim=1) if self.task == "multiclass" else torch.sigmoid(logits)
