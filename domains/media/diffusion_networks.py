"""The diffusion side of the media domain's plain ``nn.Module`` s (no Lightning): what gets exported.

- :func:`build_diffusion_unet`: MONAI's ``DiffusionModelUNet`` (class-conditional through its ``num_class_embeds``),
  with the image size and head-channel checks that name the options to change.
- :class:`GuidedDenoiser`: classifier-free guidance around a conditional denoiser.
- :class:`InferenceDenoiser`: one denoising step of the EMA UNet, what a diffusion bundle holds.

The GAN's networks, the feature extractor and the EMA helpers are in :mod:`domains.media.networks`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def build_diffusion_unet(
    image_size: int,
    channels: int,
    widths: Sequence[int] = (32, 64, 64),
    attention_levels: Sequence[bool] = (False, False, True),
    num_res_blocks: int = 1,
    norm_num_groups: int = 16,
    num_head_channels: int = 32,
    num_classes: int = 0,
) -> nn.Module:
    """MONAI ``DiffusionModelUNet`` for 2-D images; checks the image size fits its down-sampling."""
    from monai.networks.nets import DiffusionModelUNet

    levels = len(widths)
    factor = 2 ** (levels - 1)
    if image_size % factor or image_size // factor < 2:
        raise ValueError(
            f"image size {image_size} does not suit a {levels}-level diffusion UNet: it must be a multiple of {factor} "
            f"(the UNet halves it {levels - 1} times) with at least 2 pixels left; set --data.image_size or change unet_widths"
        )
    if len(attention_levels) != levels:
        raise ValueError(f"attention_levels has {len(attention_levels)} entries but unet_widths has {levels}")
    if any(w % norm_num_groups for w in widths):
        raise ValueError(f"every entry of unet_widths {list(widths)} must be a multiple of norm_num_groups={norm_num_groups}")
    attending = [w for i, (w, on) in enumerate(zip(widths, attention_levels)) if on or i == levels - 1]  # MONAI's middle block always attends
    if num_head_channels < 1 or any(w % num_head_channels for w in attending):  # MONAI's own refusal names no option
        raise ValueError(f"--model.init_args.num_head_channels {num_head_channels} must divide every width of --model.init_args.unet_widths {list(widths)} "
                         f"that has attention ({attending}: attention_levels, and the last, where the middle block always attends); try {math.gcd(*attending)}")
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=channels,
        out_channels=channels,
        channels=tuple(widths),
        attention_levels=tuple(attention_levels),
        num_res_blocks=num_res_blocks,
        norm_num_groups=norm_num_groups,
        num_head_channels=num_head_channels,
        num_class_embeds=num_classes or None,
    )


class GuidedDenoiser:
    """Classifier-free guidance around a class-conditional denoiser (Ho & Salimans 2022), as MONAI's samplers call it.

    ``guided(x, timesteps) = uncond + scale * (cond - uncond)``, ``cond`` the network's output for
    ``labels`` and ``uncond`` for ``null_label`` (the class the model was trained to treat as "no
    class"), both from one batched call. Linear in the output, so it holds for epsilon and velocity
    prediction alike. ``scale`` 0 is the unconditional model (one call), 1 the conditional one.
    """

    def __init__(self, network: nn.Module, labels: torch.Tensor, null_label: int | None, scale: float) -> None:
        if null_label is None:
            raise ValueError("classifier-free guidance needs a model trained with a null class (cond_drop_prob > 0)")
        self.network, self.labels, self.scale = network, labels, float(scale)
        self.null = torch.full_like(labels, null_label)

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.scale == 0.0:
            return self.network(x, timesteps, class_labels=self.null)
        both_t = torch.cat([timesteps, timesteps]) if timesteps.numel() == len(x) > 1 else timesteps
        both = self.network(torch.cat([x, x]), both_t, class_labels=torch.cat([self.labels, self.null]))
        cond, uncond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


class InferenceDenoiser(nn.Module):
    """What a diffusion bundle holds: one denoising step of the EMA UNet.

    ``noisy (N, C, H, W) float32, timestep (N,) float32 [, labels (N,) int64] -> predicted noise``.
    The timestep is a float (the UNet's sinusoidal embedding is defined for any real value), so any
    input is valid; a client passes the integer timesteps of the DDIM schedule in the metadata.

    Args:
        unet: the trained (EMA) MONAI ``DiffusionModelUNet`` (copied; the copy is put in eval mode).
        conditional: whether the UNet takes class labels.
    """

    def __init__(self, unet: nn.Module, conditional: bool) -> None:
        super().__init__()
        import copy

        self.unet = copy.deepcopy(unet).eval().requires_grad_(False)
        self.conditional = conditional

    def forward(self, noisy: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional:
            return self.unet(noisy.float(), timestep.float(), class_labels=labels.long() if labels is not None else None)
        return self.unet(noisy.float(), timestep.float())
