"""The GAN of the media domain: a spectral-norm hinge DCGAN trained with manual optimisation."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from domains.media.diffaugment import DiffAugment, check_probability, hue_rotation, parse_policy
from domains.media.networks import GENERATOR_PADDINGS, Discriminator, Generator, InferenceGenerator, ema_decay_at, ema_update, refresh_batch_norm_statistics
from domains.media.task import GenerativeTask, seeded_noise
from pipelines.errors import InputError
from pipelines.export_spec import ExportSpec


CLASSIFIER_HUE_TURNS = ("off", "real", "real_and_generated")
LR_SCHEDULES = ("constant", "linear")


class GAN(GenerativeTask):
    """DCGAN with spectral-normalised discriminator and hinge loss, trained with manual optimisation.

    Each batch: one discriminator step on real and generated images (hinge loss), then one generator
    step (``-D(G(z))``). Conditional models add the auxiliary classification terms
    (``class_loss_weight``). Both Adam optimisers (generator first) are in every checkpoint.

    Args:
        latent_dim: noise dimensions.
        width: discriminator width (channels of its first layer, doubled per stage) and, unless
            ``generator_width`` is set, the generator's (channels of its last hidden layer).
        generator_width: the generator's width when it differs from the discriminator's (``null``:
            ``width``). The generator is the cheap network of the pair (the discriminator runs three
            times per batch), so widening it alone costs little: see the media README.
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
            ``translation``, ``cutout``, ``hue`` (colour rotation; gray images unchanged): applied to real and generated images alike before every
            discriminator call, so a small training set is not memorised by the discriminator.
            Default: none (off; see the media README for what it measured).
        diffaugment_probability: the share of discriminator inputs DiffAugment transforms (each image drawn
            on its own, as ADA's ``p``; the others pass as they are). ``1`` (the default): every image, as in
            DiffAugment. Below 1 the discriminator also sees un-augmented images: with ``hue`` at 1 it could no
            longer see colour and the generator drew every sample in one hue (media README).
        ema_decay: decay of the exponential moving average of the generator's weights (StyleGAN2-ADA's
            "G_ema"), with the warm-up ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` generator steps, so
            a short run averages over about its last ``n / 9`` steps instead of starting from the random
            initial weights. The EMA generator draws every validation/test sample (FID, class accuracy,
            grids), ``predict``'s images and the exported/served generator; the raw generator only trains.
            Its batch-norm statistics are recomputed from its own outputs before it samples or exports
            (:func:`~domains.media.networks.refresh_batch_norm_statistics`; the raw generator's running
            statistics do not match the averaged weights). ``0``: no averaging (the EMA copy has the raw
            generator's weights).
        generator_padding: ``padding_mode`` of the generator's 3x3 convolutions, ``zeros``, ``reflect`` or
            ``replicate``. ``zeros`` (the class default, so checkpoints saved before this option load as they
            were trained) drew a square frame near the border of every sample on the shapes set; the
            domain config sets ``reflect`` (see the media README).
        classifier_hue_turn: which images the auxiliary classifier (``class_loss_weight``) sees with their colours
            turned about the grey axis by a random angle per image (DiffAugment's ``hue``), while the realness
            and projection terms see every image as it is: ``off`` (the class default: one discriminator call
            per image set, as before), ``real`` (the discriminator's cross-entropy on real images; one more
            discriminator call per batch) or ``real_and_generated`` (also the generator's on its images; two
            more). So class has to be told by shape, not hue, and the realness head still asks for every hue.
            Needs a conditional model with ``class_loss_weight > 0`` and RGB images.
        lr_schedule: ``constant`` (the default) or ``linear``: both learning rates fall linearly from their value in
            the first epoch to 0 after ``--trainer.max_epochs`` (SNGAN's schedule), stepped once per epoch; the
            schedulers' state is in every checkpoint. ``linear`` needs ``--trainer.max_epochs`` (checked when
            training starts).
        twin_classifier: TAC-GAN (Gong et al. 2019, "Twin Auxiliary Classifiers GAN"): a second classifier head on the
            discriminator's features, trained in the discriminator step on the generated images (detached) with their
            requested labels (``+ class_loss_weight * CE_twin``); the generator's class term becomes
            ``class_loss_weight * (CE(G(z, y), y) - CE_twin(G(z, y), y))``. The auxiliary classifier alone (AC-GAN) pulls
            the generator towards the easiest-to-classify images of each class (few hues, far from the class boundary);
            the twin term cancels that pull, so the class term matches the conditional distributions instead. ``false``
            (the class default: no twin head, so checkpoints saved before this option load as they were trained).
            Costs no extra discriminator call (the twin reads the features the realness head reads). Needs a
            conditional model with ``class_loss_weight > 0`` (refused otherwise); on data without labels (an
            unconditional GAN) there is no classifier and no twin, said once in the log.
        kwargs: the arguments every media model shares (:class:`GenerativeTask`).
    """

    def __init__(
        self,
        latent_dim: int = 128,
        width: int = 16,
        generator_width: int | None = None,
        lr_generator: float = 8e-4,
        lr_discriminator: float = 8e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        class_loss_weight: float = 2.0,
        conditional: bool = True,
        diffaugment: str | None = None,
        diffaugment_probability: float = 1.0,
        ema_decay: float = 0.999,
        generator_padding: str = "zeros",
        classifier_hue_turn: str = "off",
        lr_schedule: str = "constant",
        twin_classifier: bool = False,
        **kwargs: Any,
    ) -> None:
        if twin_classifier and (not conditional or class_loss_weight == 0):
            raise InputError(
                "--model.init_args.twin_classifier true trains a second classifier against the auxiliary classifier: it needs "
                f"conditional true and class_loss_weight > 0 (got conditional {conditional}, class_loss_weight {class_loss_weight}); "
                "the media config sets it, so add --model.init_args.twin_classifier false"
            )
        if lr_schedule not in LR_SCHEDULES:
            raise InputError(f"--model.init_args.lr_schedule {lr_schedule!r}: the learning-rate schedule must be one of {', '.join(LR_SCHEDULES)}")
        if classifier_hue_turn not in CLASSIFIER_HUE_TURNS:
            raise InputError(
                f"--model.init_args.classifier_hue_turn {classifier_hue_turn!r}: which images the auxiliary classifier sees "
                f"hue-turned must be one of {', '.join(CLASSIFIER_HUE_TURNS)}"
            )
        if classifier_hue_turn != "off" and (not conditional or class_loss_weight == 0):
            raise InputError(
                f"--model.init_args.classifier_hue_turn {classifier_hue_turn!r} turns the auxiliary classifier's inputs: it needs "
                f"conditional true and class_loss_weight > 0 (got conditional {conditional}, class_loss_weight {class_loss_weight})"
            )
        if classifier_hue_turn != "off" and kwargs.get("in_channels", 3) != 3:
            raise InputError(
                f"--model.init_args.classifier_hue_turn {classifier_hue_turn!r} turns colours: it needs RGB images "
                f"(3 channels), the data has {kwargs.get('in_channels')}"
            )
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if generator_width is not None and generator_width < 1:
            raise ValueError(f"generator_width must be >= 1 (or null for width), got {generator_width}")
        if class_loss_weight < 0:
            raise ValueError(f"class_loss_weight must be >= 0, got {class_loss_weight}")
        if generator_padding not in GENERATOR_PADDINGS:
            raise InputError(
                f"--model.init_args.generator_padding {generator_padding!r}: the padding of the generator's convolutions "
                f"must be one of {', '.join(GENERATOR_PADDINGS)}"
            )
        parse_policy(diffaugment)  # refused (InputError, exit 2) before anything is built or written
        check_probability(diffaugment_probability)
        super().__init__(conditional=conditional, **kwargs)
        self.automatic_optimization = False

    def build_networks(self) -> None:
        hp = self.hparams
        self.generator = Generator(hp.latent_dim, hp.image_size, hp.in_channels, hp.get("generator_width") or hp.width, self.condition_classes, hp.get("generator_padding", "zeros"))
        self.ema_generator = copy.deepcopy(self.generator).requires_grad_(False).eval()
        classifier = bool(self.condition_classes) and hp.class_loss_weight > 0
        twin = bool(hp.get("twin_classifier", False))
        if twin and not classifier:  # the domain config sets it: unlabelled data still trains (unconditional, no classifier)
            print("[media] twin_classifier: this data has no class labels, so the GAN is unconditional: no auxiliary classifier, no twin")
            twin = False
        self.discriminator = Discriminator(hp.image_size, hp.in_channels, hp.width, self.condition_classes, classifier, twin)
        self.augment = DiffAugment(parse_policy(hp.diffaugment), hp.get("diffaugment_probability", 1.0))

    def configure_optimizers(self) -> Any:
        """Adam for the generator and the discriminator (in that order), with ``lr_schedule``'s schedulers when it is ``linear``."""
        hp = self.hparams
        betas = (hp.beta1, hp.beta2)
        optimizers = [
            torch.optim.Adam(self.generator.parameters(), lr=hp.lr_generator, betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr_discriminator, betas=betas),
        ]
        if hp.get("lr_schedule", "constant") == "constant":
            return optimizers
        epochs = self.trainer.max_epochs
        if not epochs or epochs < 1:
            raise InputError(f"--model.init_args.lr_schedule linear decays over --trainer.max_epochs: set it (got {epochs})")
        factor = lambda epoch: max(0.0, 1.0 - epoch / epochs)  # noqa: E731
        return optimizers, [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]

    def on_train_epoch_end(self) -> None:
        """Manual optimisation: the schedulers of ``lr_schedule`` step here, once per epoch."""
        if self.hparams.get("lr_schedule", "constant") != "constant":
            for scheduler in self.lr_schedulers():
                scheduler.step()

    def noise_shape(self) -> tuple[int, ...]:
        return (self.hparams.latent_dim,)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The EMA generator's images (what samples, exports and serves)."""
        return self.sampling_generator()(z, labels)

    def sample(self, noise: torch.Tensor, labels: torch.Tensor | None, steps: int | None = None, sampler: str | None = None) -> torch.Tensor:
        return self.sampling_generator()(noise, labels)

    def sampling_generator(self) -> Generator:
        """The EMA generator, its batch-norm statistics recomputed once after each change of its weights."""
        if not getattr(self, "_ema_statistics_fresh", False):
            refresh_batch_norm_statistics(self.ema_generator)
            self._ema_statistics_fresh = True
        return self.ema_generator

    def train(self, mode: bool = True) -> "GAN":
        super().train(mode)
        if hasattr(self, "ema_generator"):
            self.ema_generator.eval()  # the EMA copy only ever samples: batch norm with its running statistics
        return self

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint from before the EMA generator: its EMA starts as a copy of its generator (said once)."""
        state = checkpoint["state_dict"]
        if not any(k.startswith("ema_generator.") for k in state):
            state.update({"ema_generator." + k[len("generator.") :]: v.clone() for k, v in state.items() if k.startswith("generator.")})
            print("[media] this GAN checkpoint has no EMA generator (it predates ema_decay): the EMA starts as a copy of its generator")
        super().on_load_checkpoint(checkpoint)
        self._ema_statistics_fresh = False

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """One EMA update per generator step; ``global_step`` counts both optimizers' steps and is restored on resume."""
        generator_steps = self.trainer.global_step // 2
        ema_update(self.ema_generator, self.generator, ema_decay_at(self.hparams.ema_decay, generator_steps))
        self._ema_statistics_fresh = False

    def export_spec(self, datamodule_state: dict[str, Any] | None) -> ExportSpec:
        """The EMA generator with de-normalisation: ``noise (N, latent) [, labels (N,) int64] -> images (N, C, H, W)`` in [0, 1]."""
        module = InferenceGenerator(self.sampling_generator())
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
        (d_real, real_logits, _), (d_fake, _, twin_fake_logits) = self.discriminator(self.augment(real), labels), self.discriminator(self.augment(fake), labels)
        d_loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
        hue_turn = self.hparams.get("classifier_hue_turn", "off")
        if real_logits is not None and hue_turn != "off":
            _, real_logits, _ = self.discriminator(hue_rotation(self.augment(real)), labels)
        if real_logits is not None:
            d_loss = d_loss + self.hparams.class_loss_weight * F.cross_entropy(real_logits, labels)
        if twin_fake_logits is not None:  # TAC: the twin learns the generated images' classes
            twin_loss = F.cross_entropy(twin_fake_logits, labels)
            d_loss = d_loss + self.hparams.class_loss_weight * twin_loss
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        self.check_finite("discriminator", d_loss, self.discriminator, batch_idx)
        opt_d.step()
        if not ddp:
            self.untoggle_optimizer(opt_d)
            self.toggle_optimizer(opt_g)
        generated = self.augment(self.generator(z, labels))
        g_score, fake_logits, twin_logits = self.discriminator(generated, labels)
        if fake_logits is not None and hue_turn == "real_and_generated":
            _, fake_logits, _ = self.discriminator(hue_rotation(generated), labels)
        g_loss = -g_score.mean()
        if fake_logits is not None:
            g_loss = g_loss + self.hparams.class_loss_weight * F.cross_entropy(fake_logits, labels)
        if twin_logits is not None:  # TAC: minus the twin's cross-entropy cancels AC-GAN's pull to easy samples
            g_loss = g_loss - self.hparams.class_loss_weight * F.cross_entropy(twin_logits, labels)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        self.check_finite("generator", g_loss, self.generator, batch_idx)
        opt_g.step()
        if not ddp:
            self.untoggle_optimizer(opt_g)

        size = len(real)
        self.log_train_loss(d_loss.detach() + g_loss.detach(), size)
        logged = {"train/d_loss": d_loss.detach(), "train/g_loss": g_loss.detach(), "train/d_real": d_real.detach().mean(), "train/d_fake": d_fake.detach().mean()}
        if twin_fake_logits is not None:
            logged["train/twin_class_loss"] = twin_loss.detach()  # the twin's cross-entropy on generated images (D step)
        self.log_dict(logged, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._update_real(batch["image"], batch["label"])

    def check_predict_data(self, datamodule: Any) -> None:
        """``predict``'s diffusion-only options, refused before anything is written (:mod:`pipelines.cli`): a GAN draws
        each image in one generator pass, so ``--data.generate_steps`` was ignored (exit 0), and a sampler or guidance
        scale stopped it mid-predict. Only options given count: their defaults (``None``) mean "the model's"."""
        from domains.media.data import DIFFUSION_OPTIONS

        values = {name: datamodule.hparams.get(name) for name in DIFFUSION_OPTIONS}
        given = [f"--data.{name} {f'{value:g}' if isinstance(value, float) else value}" for name, value in values.items() if value is not None]
        if given:
            raise InputError(f"{', '.join(given)}: applies to diffusion models only (domains.media.model.Diffusion: sampling steps, sampler, "
                             f"classifier-free guidance); this model is a {type(self).__name__}, which draws each image in one generator pass, "
                             "so it would be ignored. Leave it out, or predict with a diffusion model's checkpoint")  # fmt: skip

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        if "guidance" in batch and float(batch["guidance"][0]) >= 0:
            raise InputError("--data.generate_guidance_scale: a GAN draws in one generator pass; classifier-free guidance is for Diffusion only")
        return super().predict_step(batch, batch_idx)
