"""Random draws that belong to a sample, not to a batch: evaluation scores that are a function of the data alone.

An evaluation that draws noise (a diffusion loss at random timesteps, a VAE's latent code, best-of-K futures) scores
the same checkpoint on the same data differently from run to run when the draws come from the global generator, and
differently with another batch size, batch order or number of processes when they come from one generator per batch.
Here each sample's draws come from its own generator, seeded by the sample's index in its split (a stable number the
data modules put in every batch as ``index``) and a ``salt`` naming what is drawn, so a sample gets the same numbers in
any batch, on any rank and on any device (drawn on the CPU, then moved).

Example:
    >>> a = normal_per_sample(torch.tensor([0, 1, 2, 3]), (2,), salt=7)
    >>> b = torch.cat([normal_per_sample(torch.tensor([2, 3]), (2,), salt=7), normal_per_sample(torch.tensor([0, 1]), (2,), salt=7)])
    >>> torch.equal(a, b[[2, 3, 0, 1]]), torch.equal(a, normal_per_sample(torch.tensor([0, 1, 2, 3]), (2,), salt=8))
    (True, False)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch


def sample_seed(index: int, salt: int) -> int:
    """A 63-bit seed of ``(salt, index)`` from BLAKE2b: neighbouring indices and salts get unrelated streams."""
    digest = hashlib.blake2b(f"{int(salt)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _indices(indices: torch.Tensor | Sequence[int]) -> list[int]:
    return [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]


def _per_sample(
    draw: Callable[..., torch.Tensor], indices: torch.Tensor | Sequence[int], shape: tuple[int, ...], salt: int, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:  # fmt: skip
    rows = [draw(shape, generator=torch.Generator().manual_seed(sample_seed(i, salt))) for i in _indices(indices)]
    return (torch.stack(rows) if rows else torch.zeros((0, *shape))).to(device=device, dtype=dtype)


def normal_per_sample(
    indices: torch.Tensor | Sequence[int], shape: tuple[int, ...], salt: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:  # fmt: skip
    """Standard-normal draws ``(len(indices), *shape)``; row ``i`` depends only on ``indices[i]`` and ``salt``."""
    return _per_sample(torch.randn, indices, shape, salt, device, dtype)


def uniform_per_sample(
    indices: torch.Tensor | Sequence[int], shape: tuple[int, ...], salt: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:  # fmt: skip
    """Uniform draws in [0, 1) ``(len(indices), *shape)``; row ``i`` depends only on ``indices[i]`` and ``salt``."""
    return _per_sample(torch.rand, indices, shape, salt, device, dtype)
