"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

The same kind of random, differentiable transform is applied to real *and* generated images before
every discriminator call (discriminator and generator steps alike), each call drawing its own
parameters. The discriminator then never sees an un-augmented image, so it cannot overfit a small
training set, and because the transforms are differentiable the generator still gets gradients
through them; since fakes are augmented exactly as reals, the augmentation does not leak into the
generated images (unlike augmenting only the training data). Plain torch, no Lightning.

Policies, as in the authors' reference code (images in [-1, 1], ``(N, C, H, W)``):

- ``color``: random brightness (+-0.5), saturation (x0..2 around the channel mean) and contrast
  (x0.5..1.5 around the image mean);
- ``translation``: a random shift of up to 1/8 of the side, zero padding;
- ``cutout``: a random square of half the side set to zero;
- ``hue`` (not in the reference code): a rotation of every pixel's colour about the grey axis by a random
  angle per image (0..2 pi): hue turns, grey levels, brightness and the contrast of edges stay, so the
  discriminator still judges shape, contrast and texture but cannot tell real from fake, or one class
  from another, by hue. Unlike ``color`` it leaves luminance and contrast alone. A gray image has no hue: it
  is left as it is (every gray pixel is a fixed point of the rotation), so a config with ``hue`` also
  trains on gray data.

Example:
    >>> augment = DiffAugment(parse_policy("color,translation,cutout"))
    >>> augment(torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from pipelines.errors import InputError, did_you_mean


def brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)


def saturation(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) * 2) + mean


def contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its side (independently in y and x); what leaves is lost, zeros come in."""
    n, _, h, w = x.shape
    shift_y, shift_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-shift_y, shift_y + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-shift_x, shift_x + 1, (n, 1, 1), device=x.device)
    batch, rows, cols = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    rows = torch.clamp(rows + dy + 1, 0, h + 1)
    cols = torch.clamp(cols + dx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])  # the border of zeros is what clamped indices read
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero a square of ``ratio`` of the side at a random centre of each image (clipped at the borders)."""
    n, _, h, w = x.shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    offset_y = torch.randint(0, h + (1 - size_y % 2), (n, 1, 1), device=x.device)
    offset_x = torch.randint(0, w + (1 - size_x % 2), (n, 1, 1), device=x.device)
    batch, rows, cols = torch.meshgrid(
        torch.arange(n, device=x.device), torch.arange(size_y, device=x.device), torch.arange(size_x, device=x.device), indexing="ij"
    )
    rows = torch.clamp(rows + offset_y - size_y // 2, 0, h - 1)
    cols = torch.clamp(cols + offset_x - size_x // 2, 0, w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[batch, rows, cols] = 0
    return x * mask.unsqueeze(1)


def hue_rotation(x: torch.Tensor) -> torch.Tensor:
    """Rotate each RGB image's colours about the grey axis ``(1, 1, 1)`` by its own random angle (Rodrigues' formula).

    Grey pixels (``r = g = b``) are fixed points and the rotation is orthogonal, so the mean of the channels
    (brightness) and distances between colours are kept; a 120-degree turn maps red to green to blue.
    """
    if x.size(1) == 1:
        return x  # gray: no hue to turn (the rotation fixes every gray pixel)
    if x.size(1) != 3:
        raise ValueError(f"the DiffAugment policy 'hue' needs gray or RGB images, got {x.size(1)} channels")
    angle = torch.rand(x.size(0), 1, 1, dtype=x.dtype, device=x.device) * (2 * torch.pi)
    axis = torch.full((3,), 3**-0.5, dtype=x.dtype, device=x.device)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], dtype=x.dtype, device=x.device) * 3**-0.5
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    rotation = torch.cos(angle) * eye + torch.sin(angle) * cross + (1 - torch.cos(angle)) * torch.outer(axis, axis)  # (N, 3, 3)
    return torch.einsum("nij,njhw->nihw", rotation, x)


POLICIES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "color": (brightness, saturation, contrast),
    "translation": (translation,),
    "cutout": (cutout,),
    "hue": (hue_rotation,),
}


def parse_policy(spec: str | None, option: str = "--model.init_args.diffaugment") -> tuple[str, ...]:
    """``"color,translation,cutout"`` -> ``("color", "translation", "cutout")``; ``None``/``""``/``"none"`` -> ``()``.

    An unknown or repeated name is an ``InputError`` naming the option, the name and the closest known policy.
    """
    if spec is None or spec.strip().lower() in ("", "none"):
        return ()
    names = tuple(part.strip() for part in spec.split(","))
    for name in names:
        if name not in POLICIES:
            raise InputError(
                f"{option} {spec!r}: unknown DiffAugment policy {name!r}{did_you_mean(name, POLICIES)}; "
                f"give a comma-separated list of {', '.join(POLICIES)} (e.g. color,translation,cutout), or leave it out for none"
            )
    if len(set(names)) != len(names):
        raise InputError(f"{option} {spec!r}: each policy once, please (the list is applied in order)")
    return names


def check_probability(probability: float, option: str = "--model.init_args.diffaugment_probability") -> float:
    """``probability`` as a float in (0, 1], else an ``InputError`` naming ``option``."""
    if not isinstance(probability, (int, float)) or not 0.0 < float(probability) <= 1.0:
        raise InputError(f"{option} {probability!r}: the share of discriminator inputs to augment must be in (0, 1] (1: every image, as in DiffAugment)")
    return float(probability)


class DiffAugment:
    """Applies the policies in order; a no-op without policies. Call it on real and on generated images alike.

    ``probability`` below 1 augments each image of a call with that probability and leaves the others as they
    are (one draw per image for the whole list, as ADA's ``p``): the discriminator then also sees un-augmented
    images, so it can still judge what the augmentation hides (with ``hue``, the colours).
    """

    def __init__(self, policies: tuple[str, ...], probability: float = 1.0) -> None:
        self.policies = policies
        self.functions = [f for name in policies for f in POLICIES[name]]
        self.probability = check_probability(probability, "DiffAugment probability")

    def __bool__(self) -> bool:
        return bool(self.functions)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.functions:
            return x
        out = x
        for function in self.functions:
            out = function(out)
        if self.probability < 1.0:
            chosen = torch.rand(x.size(0), 1, 1, 1, device=x.device) < self.probability
            out = torch.where(chosen, out, x)
        return out
