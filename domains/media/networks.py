"""Plain ``nn.Module`` s of the media domain (no Lightning): what gets exported.

- :class:`Generator` / :class:`Discriminator`: a DCGAN pair. The discriminator uses spectral
  normalisation on every layer (Miyato et al. 2018) and, for class-conditional data, a projection
  head and an auxiliary classifier; the generator takes the class as a learned embedding
  concatenated to the noise and through class-conditional batch norm in every stage.
- The diffusion UNet, guidance and the exported denoiser: :mod:`domains.media.diffusion_networks`.
- :class:`FeatureCNN`: the small classifier whose penultimate layer is the offline FID/KID feature
  space (``num_features`` is read by torchmetrics).
- :func:`ema_update`: exponential moving average of weights (both families).

Every builder checks that the image size suits the network and says which sizes do.

Example:
    >>> g = Generator(latent_dim=16, image_size=28, channels=1, width=8)
    >>> g(torch.zeros(2, 16)).shape
    torch.Size([2, 1, 28, 28])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def gan_upsamplings(image_size: int) -> int:
    """Number of x2 stages of the DCGAN pair for ``image_size``: up to 4, from a base of >= 4 pixels.

    Raises ``ValueError`` when the size is not a multiple of 4 of at least 16 (e.g. 16, 28, 32, 64).
    """
    if image_size < 16 or image_size % 4:
        raise ValueError(
            f"image size {image_size} does not suit the DCGAN generator/discriminator: it needs a multiple of 4 "
            "of at least 16 (e.g. 16, 28, 32, 64); set --data.image_size"
        )
    stages = 2
    while stages < 4 and image_size % 2 ** (stages + 1) == 0 and image_size // 2 ** (stages + 1) >= 4:
        stages += 1
    return stages


GENERATOR_PADDINGS = ("zeros", "reflect", "replicate")


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose gain and bias are looked up per class (de Vries et al. 2017; SNGAN/BigGAN generators).

    Gains start at 1 and biases at 0, so it starts as plain batch norm; every class then learns its
    own modulation of every feature map, which puts the label into each stage of the generator
    instead of only its input.
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.gain(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]


class Generator(nn.Module):
    """DCGAN generator: noise (+ class embedding) -> ``base x base`` features -> x2 (nearest upsampling +
    3x3 convolution, no checkerboard artefacts) stages -> tanh.

    Class-conditional generators take the class twice: as a learned embedding concatenated to the
    noise and through :class:`ConditionalBatchNorm2d` in every upsampling stage.

    Args:
        latent_dim: noise dimensions.
        image_size: output side (see :func:`gan_upsamplings`).
        channels: output channels (1 or 3).
        width: channels of the last hidden layer (doubled per stage towards the input).
        num_classes: classes for conditional generation (0: unconditional).
        padding: ``padding_mode`` of every 3x3 convolution (:data:`GENERATOR_PADDINGS`). ``zeros`` (what generators
            before this option used) rings each stage's maps with zeros, which training turned into a square frame
            near the image border; ``reflect`` continues the picture instead (media README).
    """

    def __init__(self, latent_dim: int, image_size: int, channels: int, width: int = 64, num_classes: int = 0, padding: str = "zeros") -> None:
        super().__init__()
        if padding not in GENERATOR_PADDINGS:
            raise ValueError(f"generator padding must be one of {', '.join(GENERATOR_PADDINGS)}, got {padding!r}")
        stages = gan_upsamplings(image_size)
        self.latent_dim, self.num_classes, self.base = latent_dim, num_classes, image_size // 2**stages
        embed_dim = 16 if num_classes else 0
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        top = width * 2 ** (stages - 1)
        self.project = nn.Sequential(nn.Linear(latent_dim + embed_dim, top * self.base**2), nn.BatchNorm1d(top * self.base**2), nn.ReLU(True))
        self.top = top
        self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
        for stage in range(stages - 1):  # nearest x2 + 3x3 convolution: no checkerboard (Odena et al. 2016)
            c_in, c_out = top // 2**stage, top // 2 ** (stage + 1)
            self.convs.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False, padding_mode=padding)))
            self.norms.append(ConditionalBatchNorm2d(c_out, num_classes) if num_classes else nn.BatchNorm2d(c_out))
        self.out = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(width, channels, 3, 1, 1, padding_mode=padding), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError("this generator is class-conditional: pass labels")
            z = torch.cat([z, self.embed(labels)], 1)
        # unflatten, not view(len(z), ...): the batch size stays dynamic when the generator is traced for export
        x = self.project(z).unflatten(1, (self.top, self.base, self.base))
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            x = torch.relu(norm(x, labels) if self.embed is not None else norm(x))
        return self.out(x)


def minibatch_stddev(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append the feature standard deviation across a group of samples as one channel (ProGAN/StyleGAN).

    The discriminator then sees how varied a batch is, which counters the generator's collapse to
    one image per class.
    """
    n, c, h, w = x.shape
    g = min(group, n)
    while n % g:
        g -= 1
    y = x.view(g, n // g, c, h, w)
    std = (y.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))  # (n // g,)
    return torch.cat([x, std.repeat(g).view(n, 1, 1, 1).expand(n, 1, h, w)], 1)


class Discriminator(nn.Module):
    """DCGAN discriminator with spectral norm on every layer, a minibatch standard-deviation channel
    before the last convolution, a projection head for classes and, optionally, an auxiliary
    classifier head.

    The projection term (Miyato & Koyama 2018) only rewards class-specific features once the
    discriminator has them; the auxiliary classifier (AC-GAN, Odena et al. 2017) is trained on real
    images with their labels, so the discriminator learns those features from the start and the
    generator is told directly when its image is not of the requested class.

    Args:
        image_size: input side (see :func:`gan_upsamplings`).
        channels: input channels.
        width: channels of the first layer (doubled per stage).
        num_classes: classes for the projection term (0: unconditional).
        classifier: add the auxiliary classifier head (needs ``num_classes``).
        twin_classifier: add a second classifier head for generated images (TAC-GAN, Gong et al. 2019; needs ``classifier``).
    """

    def __init__(self, image_size: int, channels: int, width: int = 64, num_classes: int = 0, classifier: bool = False, twin_classifier: bool = False) -> None:
        super().__init__()
        if classifier and not num_classes:
            raise ValueError("the auxiliary classifier head needs num_classes > 0")
        if twin_classifier and not classifier:
            raise ValueError("the twin classifier head needs the auxiliary classifier head")
        stages = gan_upsamplings(image_size)
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(channels, width, 3, 1, 1)), nn.LeakyReLU(0.1, True)]
        c = width
        for _ in range(stages):
            layers += [spectral_norm(nn.Conv2d(c, c * 2, 4, 2, 1)), nn.LeakyReLU(0.1, True)]
            c *= 2
        self.body = nn.Sequential(*layers)
        self.last = nn.Sequential(spectral_norm(nn.Conv2d(c + 1, c, 3, 1, 1)), nn.LeakyReLU(0.1, True))
        self.head = spectral_norm(nn.Linear(c, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, c)) if num_classes else None
        self.classifier = spectral_norm(nn.Linear(c, num_classes)) if classifier else None
        self.twin_classifier = spectral_norm(nn.Linear(c, num_classes)) if twin_classifier else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(realness score (N,), class logits (N, num_classes), twin class logits)``, ``None`` for a head it lacks."""
        features = self.last(minibatch_stddev(self.body(x))).sum((2, 3))  # global sum pooling (SNGAN)
        out = self.head(features)[:, 0]
        if self.embed is not None:
            if labels is None:
                raise ValueError("this discriminator is class-conditional: pass labels")
            out = out + (self.embed(labels) * features).sum(1)
        return out, *(head(features) if head is not None else None for head in (self.classifier, self.twin_classifier))


class FeatureCNN(nn.Module):
    """A small classifier; :meth:`features` (global-pooled penultimate layer) is the FID/KID feature space.

    ``forward`` returns the features (what torchmetrics calls); :meth:`logits` is used for training.
    Global *max* pooling is the default: it keeps "is there a corner/curve anywhere" features that
    averaging over a textured background washes out (on the shapes set the same network reaches
    99 % validation accuracy with max pooling and 60 % with average pooling, 200-400 batches).

    Args:
        channels: input channels.
        num_outputs: classes of the training task (data classes, or 4 rotations when unlabelled).
        width: channels of the first block (x2, x4 in the next ones); ``num_features = 4 * width``.
        pooling: global pooling of the last block, ``max`` or ``avg`` (extractors saved before
            ``max`` existed used ``avg``).
    """

    def __init__(self, channels: int, num_outputs: int, width: int = 32, pooling: Literal["max", "avg"] = "max") -> None:
        super().__init__()
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        self.pooling = pooling

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]

        self.body = nn.Sequential(
            *block(channels, width), nn.AvgPool2d(2),
            *block(width, 2 * width), nn.AvgPool2d(2),
            *block(2 * width, 4 * width), nn.AdaptiveMaxPool2d(1) if pooling == "max" else nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.classifier = nn.Linear(4 * width, num_outputs)
        self.num_features = 4 * width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class FrozenFeatures(nn.Module):
    """Wraps a feature network for torchmetrics: always in eval mode, never trained, no gradients."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.num_features = network.num_features
        self.network.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay after ``step`` optimizer steps: ``min(decay, (1 + step) / (10 + step))`` (a warm-up, so the average
    of a short run is not dominated by the random initial weights). It depends on the step alone, so a resumed run
    (whose step is restored) continues with the decay an uninterrupted run has."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def refresh_batch_norm_statistics(generator: "Generator", batches: int = 16, batch_size: int = 64, seed: int = 0) -> None:
    """Recompute the running statistics of ``generator``'s batch norms from its own outputs ("standing statistics",
    Brock et al. 2019, BigGAN), leaving it in eval mode.

    An EMA generator's weights are an average, but the running statistics it would otherwise carry are those of the
    raw generator's batches, which do not match the averaged weights' activations. Here they are the exact mean
    and variance over ``batches`` batches of seeded noise (classes in turn), so the result depends on the weights
    alone: the same weights always give the same statistics and samples.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    generator.train()
    device = next(generator.parameters()).device
    noise = torch.Generator().manual_seed(seed)
    try:
        for index in range(batches):
            z = torch.randn(batch_size, generator.latent_dim, generator=noise).to(device)
            labels = (torch.arange(batch_size) + index * batch_size) % generator.num_classes if generator.num_classes else None
            generator(z, labels.to(device) if labels is not None else None)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        generator.eval()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied.

    The update is torch's own (:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`, built per call
    because the decay warms up step by step); the EMA stays a plain copy of the network, so its
    checkpoint keys and its export are those of the network itself.
    """
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    ema_params = list(ema.parameters())
    model_params = [p.detach() for p in model.parameters()]
    if ema_params:
        get_ema_multi_avg_fn(decay)(ema_params, model_params, None)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


class InferenceGenerator(nn.Module):
    """What a GAN bundle holds: ``noise (N, latent) [, labels (N,) int64] -> images (N, C, H, W)`` in [0, 1].

    The generator's tanh output in [-1, 1] is de-normalised inside (``(x + 1) / 2``, clamped), so a
    client only scales by 255 to get 8-bit pixels.

    Args:
        generator: a trained :class:`Generator` (copied; the copy is put in eval mode).
    """

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        import copy

        self.generator = copy.deepcopy(generator).eval().requires_grad_(False)
        self.conditional = generator.embed is not None

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        images = self.generator(noise.float(), labels.long() if labels is not None else None)
        return ((images + 1) / 2).clamp(0, 1)

