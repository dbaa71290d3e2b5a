"""The GAN of the media domain: a spectral-norm hinge DCGAN trained with manual optimisation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from domains.media.diffaugment import DiffAugment, parse_policy
from domains.media.networks import Discriminator, Generator, InferenceGenerator
from domains.media.task import GenerativeTask, seeded_noise
from pipelines.errors import InputError
from pipelines.export_spec import ExportSpec


class GAN(GenerativeTask):
    """DCGAN with spectral-normalised discriminator and hinge loss, trained with manual optimisation.

    Each batch: one discriminator step on real and generated images (hinge loss), then one generator
    step (``-D(G(z))``). Conditional models add the auxiliary classification terms
    (``class_loss_weight``). Both Adam optimisers (generator first) are in every checkpoint.

    Args:
        latent_dim: noise dimensions.
        width: generator/discriminator width (channels of the outermost hidden layer).
        lr_generator: Adam learning rate of the generator.
        lr_discriminator: Adam learning rate of the discriminator. On the shapes set a discriminator
            8x slower than the generator (the former default, 1e-4) lost the game (hinge loss ~1.8 of
            2) and never pushed the generator towards class-specific shapes.
        beta1: Adam beta1 (0.0 or 0.5 are usual for GANs).
        beta2: Adam beta2.
        conditional: condition on class labels when the data has them (generator: label embedding and
            conditional batch norm; discriminator: projection and auxiliary classifier).
        class_loss_weight: weight of the auxiliary classification terms of conditional models: the
            discriminator's cross-entropy on real images with their labels, and the generator's on
            its images with the requested labels (0: projection only, which on the shapes set left
            the class ignored: see the media README).
        diffaugment: DiffAugment policies (Zhao et al. 2020), a comma-separated list of ``color``,
            ``translation``, ``cutout``: applied to real and generated images alike before every
            discriminator call, so a small training set is not memorised by the discriminator.
            Default: none (off; see the media README for what it measured).
        kwargs: the arguments every media model shares (:class:`GenerativeTask`).
    """

    def __init__(
        self,
        latent_dim: int = 128,
        width: int = 16,
        lr_generator: float = 8e-4,
        lr_discriminator: float = 8e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        class_loss_weight: float = 2.0,
        conditional: bool = True,
        diffaugment: str | None = None,
        **kwargs: Any,
    ) -> None:
        if class_loss_weight < 0:
            raise ValueError(f"class_loss_weight must be >= 0, got {class_loss_weight}")
        parse_policy(diffaugment)  # refused (InputError, exit 2) before anything is built or written
        super().__init__(conditional=conditional, **kwargs)
        self.automatic_optimization = False

    def build_networks(self) -> None:
        hp = self.hparams
        self.generator = Generator(hp.latent_dim, hp.image_size, hp.in_channels, hp.width, self.condition_classes)
        classifier = bool(self.condition_classes) and hp.class_loss_weight > 0
        self.discriminator = Discriminator(hp.image_size, hp.in_channels, hp.width, self.condition_classes, classifier)
        self.augment = DiffAugment(parse_policy(hp.diffaugment))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        betas = (hp.beta1, hp.beta2)
        return [
            torch.optim.Adam(self.generator.parameters(), lr=hp.lr_generator, betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr_discriminator, betas=betas),
        ]

    def noise_shape(self) -> tuple[int, ...]:
        return (self.hparams.latent_dim,)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.generator(z, labels)

    def sample(self, noise: torch.Tensor, labels: torch.Tensor | None, steps: int | None = None, sampler: str | None = None) -> torch.Tensor:
        was_training = self.generator.training
        self.generator.eval()
        try:
            return self.generator(noise, labels)
        finally:
            self.generator.train(was_training)

    def export_spec(self, datamodule_state: dict[str, Any] | None) -> ExportSpec:
        """The generator with de-normalisation: ``noise (N, latent) [, labels (N,) int64] -> images (N, C, H, W)`` in [0, 1]."""
        module = InferenceGenerator(self.generator)
        noise = seeded_noise([0, 1, 2, 3], self.noise_shape())
        inputs, names = (noise,), ["noise"]
        if self.condition_classes:
            inputs, names = (noise, torch.arange(4) % self.condition_classes), ["noise", "labels"]
        metadata = {**self.export_metadata(), "latent_dim": int(self.hparams.latent_dim), "value_range": [0.0, 1.0], "output_layout": "NCHW"}
        axes = {name: {0: "batch"} for name in (*names, "images")}
        return ExportSpec(module, inputs, names, ["images"], axes, metadata)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        real = batch["image"]
        labels = self._labels_for(batch["label"], len(real))
        z = torch.randn(len(real), self.hparams.latent_dim, device=self.device)

        # Single process: each step computes gradients for its own network only (toggle + detach). Under
        # DDP every parameter must receive a gradient in every backward, so both networks take part
        # in both steps; the other network's gradients are zeroed before its own step.
        ddp = self.trainer.world_size > 1
        if not ddp:
            self.toggle_optimizer(opt_d)
        fake = self.generator(z, labels)
        fake = fake if ddp else fake.detach()
        # DiffAugment (when set): reals and fakes alike, fresh parameters per call; the identity otherwise
        (d_real, real_logits), (d_fake, _) = self.discriminator(self.augment(real), labels), self.discriminator(self.augment(fake), labels)
        d_loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
        if real_logits is not None:
            d_loss = d_loss + self.hparams.class_loss_weight * F.cross_entropy(real_logits, labels)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        self.check_finite("discriminator", d_loss, self.discriminator, batch_idx)
        opt_d.step()
        if not ddp:
            self.untoggle_optimizer(opt_d)
            self.toggle_optimizer(opt_g)
        g_score, fake_logits = self.discriminator(self.augment(self.generator(z, labels)), labels)
        g_loss = -g_score.mean()
        if fake_logits is not None:
            g_loss = g_loss + self.hparams.class_loss_weight * F.cross_entropy(fake_logits, labels)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        self.check_finite("generator", g_loss, self.generator, batch_idx)
        opt_g.step()
        if not ddp:
            self.untoggle_optimizer(opt_g)

        size = len(real)
        self.log_train_loss(d_loss.detach() + g_loss.detach(), size)
        self.log_dict(
            {"train/d_loss": d_loss.detach(), "train/g_loss": g_loss.detach(), "train/d_real": d_real.detach().mean(), "train/d_fake": d_fake.detach().mean()},
            on_step=False, on_epoch=True, batch_size=size, sync_dist=True,
        )  # fmt: skip

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._update_real(batch["image"], batch["label"])

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        if "guidance" in batch and float(batch["guidance"][0]) >= 0:
            raise InputError("--data.generate_guidance_scale: a GAN draws in one generator pass; classifier-free guidance is for Diffusion only")
        return super().predict_step(batch, batch_idx)
