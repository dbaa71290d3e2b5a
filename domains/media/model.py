"""Generative LightningModules: a GAN and a diffusion model behind one base, picked by ``model.class_path``.

:class:`GenerativeTask` holds what both share: the offline FID/KID feature extractor (trained at
the start of ``fit``, see :mod:`domains.media.features`), validation and test FID/KID against the
real split (``val/fid_cnn``, the checkpoint monitor, and ``val/kid_cnn``), for conditional models
whether the samples show their class (``val/class_acc_cnn``: the extractor's accuracy on samples
generated for the validation labels, when it classifies the data's classes), a sample grid every
epoch (``plots/val_samples.png``, one copy per epoch under ``plots/samples/``, and W&B), seeded
generation for ``predict`` (PNG files plus ``predictions.csv`` rows), and the non-finite loss guard
(the run stops with the step, after saving ``checkpoints/before-nonfinite-step<N>.ckpt`` with the
weights from before it). :class:`GAN` trains with manual optimisation (two optimisers, both in the
checkpoint); :class:`Diffusion` is MONAI's ``DiffusionModelUNet`` with DDPM training, an EMA copy
for sampling and DDIM (or DDPM) sampling with a configurable number of steps.
"""

from __future__ import annotations

import copy
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import get_total_norm
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from domains.media.features import INCEPTION, OFFLINE_EXTRACTOR, accuracy, inception_metrics, load_extractor, save_extractor, train_feature_cnn
from domains.media.networks import Discriminator, FeatureCNN, FrozenFeatures, Generator, InferenceDenoiser, InferenceGenerator, build_diffusion_unet, ema_update
from pipelines.export_spec import ExportSpec
from pipelines.plots import image_grid
from pipelines.task import BaseTask
from pipelines.tracking import log_figure


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the run stops instead of saving garbage."""


def seeded_noise(seeds: torch.Tensor | list[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per seed: image ``i`` depends only on its own seed."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(rows).to(device)


def ddim_schedule(scheduler: Any, steps: int) -> dict[str, Any]:
    """The facts a client needs to run MONAI's DDIM loop (eta 0) without torch, as JSON-ready lists.

    ``timesteps`` are those of ``scheduler.set_timesteps(steps)`` (descending); each step goes from
    ``t`` to ``t - step_stride`` and uses ``final_alpha_cumprod`` when that is negative.
    """
    scheduler.set_timesteps(steps)
    return {
        "kind": "ddim",
        "num_train_timesteps": int(scheduler.num_train_timesteps),
        "sampling_steps": int(steps),
        "timesteps": [int(t) for t in scheduler.timesteps.tolist()],
        "step_stride": int(scheduler.num_train_timesteps // steps),
        "alphas_cumprod": [float(a) for a in scheduler.alphas_cumprod.double().tolist()],
        "final_alpha_cumprod": float(scheduler.final_alpha_cumprod),
        "prediction_type": str(scheduler.prediction_type),
        "clip_sample": bool(scheduler.clip_sample),
        "clip_sample_values": [float(v) for v in scheduler.clip_sample_values],
        "eta": 0.0,
    }


class GenerativeTask(BaseTask):
    """Base of the media models: metrics, sample grids, generation, the non-finite guard.

    Subclasses build their networks in ``configure_models`` and implement :meth:`noise_shape`,
    :meth:`sample` and ``training_step``. Shared ``__init__`` arguments (each subclass declares them, so
    ``--help`` lists them per model): ``in_channels``, ``image_size``, ``num_classes``, ``class_names``
    (linked from the data), ``conditional``, ``fid_samples``, ``kid_subset_size``, ``grid_samples``,
    ``extractor_steps``, ``extractor_width``, ``extractor_max_images``, ``feature_extractor_weights``,
    ``inception_metrics`` and ``cpu_threads``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._real_labels: list[torch.Tensor] = []

    def configure_models(self) -> None:
        hp = self.hparams
        if hp.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {hp.in_channels}")
        if hp.class_names and len(hp.class_names) != hp.num_classes:
            raise ValueError(f"{len(hp.class_names)} class_names for num_classes={hp.num_classes}")
        if hp.fid_samples < 2:
            raise ValueError(f"fid_samples must be at least 2, got {hp.fid_samples}")
        self.build_networks()

    # ----- conditioning ----------------------------------------------------------------------
    @property
    def condition_classes(self) -> int:
        """Classes the generator is conditioned on (0: unconditional)."""
        return int(self.hparams.num_classes) if self.hparams.conditional and self.hparams.num_classes > 0 else 0

    def class_label(self, label: int) -> str:
        names = self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]
        return names[label] if 0 <= label < len(names) else "-"

    def _labels_for(self, labels: torch.Tensor | None, count: int) -> torch.Tensor | None:
        """The class each image is conditioned on: its label, or for unlabelled images (-1) the classes in turn.

        Element-wise, so a training step does not wait for the device to say whether labels are missing.
        """
        if not self.condition_classes:
            return None
        cycled = torch.arange(count, device=self.device) % self.condition_classes
        if labels is None:
            return cycled
        labels = labels.to(self.device).long()
        return torch.where(labels < 0, cycled, labels)

    # ----- what subclasses implement --------------------------------------------------------------
    def build_networks(self) -> None:
        """Build the networks (from ``networks.py``); the image size is checked there."""
        raise NotImplementedError

    def noise_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def sample(self, noise: torch.Tensor, labels: torch.Tensor | None, steps: int | None = None, sampler: str | None = None) -> torch.Tensor:
        """Images in [-1, 1] from ``noise`` (and class ``labels`` for conditional models)."""
        raise NotImplementedError

    def eval_sampling_steps(self) -> int | None:
        return None

    @torch.no_grad()
    def generate(self, seeds: list[int] | torch.Tensor, labels: torch.Tensor | None = None, steps: int | None = None, sampler: str | None = None, batch_size: int = 256) -> torch.Tensor:
        """Seeded images ``(N, C, H, W)`` in [-1, 1]; the global random state is left untouched."""
        seeds = [int(s) for s in seeds]
        labels = self._labels_for(labels, len(seeds))
        out = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seeds[0] if seeds else 0)
            for start in range(0, len(seeds), batch_size):
                chunk = seeds[start : start + batch_size]
                noise = seeded_noise(chunk, self.noise_shape(), self.device)
                chunk_labels = labels[start : start + batch_size] if labels is not None else None
                out.append(self.sample(noise, chunk_labels, steps, sampler).clamp(-1, 1))
        return torch.cat(out)

    # ----- export -----------------------------------------------------------------------------------
    def export_spec(self, datamodule_state: dict[str, Any] | None) -> ExportSpec:
        """Every media model is exportable: :class:`GAN` (the generator) and :class:`Diffusion` (one denoiser step)
        override this; a new subclass must too."""
        raise NotImplementedError(f"{type(self).__name__} does not implement export_spec(); GAN and Diffusion do")

    def export_metadata(self) -> dict[str, Any]:
        """Facts every media bundle carries: the model kind, image geometry, classes and value range."""
        hp = self.hparams
        classes = self.condition_classes
        names = list(hp.class_names) if hp.class_names else [str(i) for i in range(int(hp.num_classes))]
        return {
            "model": type(self).__name__,
            "image_size": int(hp.image_size),
            "channels": int(hp.in_channels),
            "conditional": bool(classes),
            "num_classes": int(classes),
            "class_names": names[:classes] if classes else names,
            "noise_shape": list(self.noise_shape()),
            "noise": "standard normal, one tensor of noise_shape per image",
        }

    # ----- the offline feature extractor and the metrics -------------------------------------
    def configure_metrics(self) -> None:
        hp = self.hparams
        if hp.feature_extractor_weights:
            extractor = load_extractor(hp.feature_extractor_weights, hp.in_channels)
            ready = True
        else:
            outputs = hp.num_classes if hp.num_classes >= 2 else 4
            extractor = FeatureCNN(hp.in_channels, outputs, hp.extractor_width)
            ready = False
        self.extractor = extractor.requires_grad_(False)
        self.register_buffer("extractor_ready", torch.tensor(ready))
        frozen = FrozenFeatures(self.extractor)
        self.fid = FrechetInceptionDistance(feature=frozen, reset_real_features=True)
        self.kid = KernelInceptionDistance(feature=frozen, subset_size=hp.kid_subset_size, reset_real_features=True)
        self.inception = nn.ModuleList(inception_metrics(hp.kid_subset_size)) if hp.inception_metrics else None

    def _ensure_extractor(self) -> None:
        if bool(self.extractor_ready):
            return
        hp = self.hparams
        datamodule = self.trainer.datamodule
        images, labels = datamodule.split_tensors("train", hp.extractor_max_images)
        net = train_feature_cnn(images.to(self.device), labels.to(self.device), steps=hp.extractor_steps, width=hp.extractor_width)
        state = self.trainer.strategy.broadcast({k: v.cpu() for k, v in net.state_dict().items()})
        self.extractor.load_state_dict(state)
        self.extractor.eval()
        self.extractor_ready.fill_(True)
        if self.trainer.is_global_zero:
            val_images, val_labels = datamodule.split_tensors("val", 2000)
            task = net.task  # type: ignore[attr-defined]
            score = accuracy(self.extractor, val_images.to(self.device), val_labels.to(self.device) if task == "classes" else None)
            details = {"task": task, "val_accuracy": round(score, 4), "train_images": len(images), "steps": hp.extractor_steps}
            path = save_extractor(self.extractor, Path(self.trainer.default_root_dir), details)
            print(f"[media] feature extractor '{OFFLINE_EXTRACTOR}' ({task}, val accuracy {score:.3f}) saved to {path}")

    def on_fit_start(self) -> None:
        self._ensure_extractor()

    def on_validation_start(self) -> None:
        self._ensure_extractor()

    def on_test_start(self) -> None:
        self._ensure_extractor()

    def _metrics(self) -> list[tuple[str, nn.Module, nn.Module]]:
        metrics = [(OFFLINE_EXTRACTOR, self.fid, self.kid)]
        if self.inception is not None:
            metrics.append((INCEPTION, self.inception[0], self.inception[1]))
        return metrics

    def _update_real(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        for name, fid, kid in self._metrics():
            batch = (images + 1) / 2 if name == INCEPTION else images
            fid.update(batch, real=True)
            kid.update(batch, real=True)
        self._real_labels.append(labels.detach())

    def _evaluate_samples(self, stage: str) -> None:
        labels = torch.cat(self._real_labels) if self._real_labels else torch.empty(0, dtype=torch.long)
        self._real_labels = []
        count = min(len(labels), self.hparams.fid_samples)
        if self.trainer.sanity_checking or count < 2:
            for _, fid, kid in self._metrics():
                fid.reset()
                kid.reset()
            return
        seed = 10_000 * (1 + self.global_rank)  # the same noise every epoch: epochs are compared on equal terms
        fake = self.generate(list(range(seed, seed + count)), labels[:count], steps=self.eval_sampling_steps())
        for name, fid, kid in self._metrics():
            batch = (fake + 1) / 2 if name == INCEPTION else fake
            fid.update(batch, real=False)
            kid.update(batch, real=False)
            kid.subset_size = min(self.hparams.kid_subset_size, count)
            kid_mean, kid_std = kid.compute()
            self.log(f"{stage}/fid_{name}", fid.compute(), sync_dist=False)
            self.log(f"{stage}/kid_{name}", kid_mean, sync_dist=False)
            self.log(f"{stage}/kid_{name}_std", kid_std, sync_dist=False)
            fid.reset()
            kid.reset()
        if self.condition_classes and self.extractor.classifier.out_features == self.condition_classes:
            with torch.no_grad():
                predicted = self.extractor.logits(fake).argmax(1)
            obeyed = (predicted == labels[:count].to(self.device)).float().mean()
            self.log(f"{stage}/class_acc_{OFFLINE_EXTRACTOR}", obeyed, sync_dist=True)

    def _log_grid(self, stage: str) -> None:
        count = self.hparams.grid_samples
        if not count or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        labels = torch.arange(count) % self.condition_classes if self.condition_classes else None
        images = self.generate(list(range(count)), labels, steps=self.eval_sampling_steps())
        titles = [self.class_label(int(label)) for label in labels] if labels is not None else None
        path = log_figure(self.trainer, image_grid(images, titles), f"{stage}/samples")
        if path is not None and stage == "val":
            copy_to = path.parent / "samples" / f"epoch_{self.current_epoch:03d}.png"
            copy_to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy_to)

    def on_validation_epoch_end(self) -> None:
        self._evaluate_samples("val")
        self._log_grid("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate_samples("test")
        self._log_grid("test")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._update_real(batch["image"], batch["label"])

    # ----- predict: seeded images written to a folder ---------------------------------------------
    def output_dir(self) -> Path:
        """``data.generate_dir``, else ``<run folder>/generated`` (a data option: on ``predict --ckpt_path``
        LightningCLI replaces the model's options with the checkpoint's)."""
        folder = getattr(getattr(self.trainer, "datamodule", None), "hparams", {}).get("generate_dir")
        return Path(folder) if folder else Path(self.trainer.default_root_dir) / "generated"

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        from PIL import Image

        from domains.media.data import to_uint8

        steps = int(batch["steps"][0]) if "steps" in batch and int(batch["steps"][0]) > 0 else None
        images = to_uint8(self.generate(batch["seed"].tolist(), batch["label"], steps=steps))
        folder = self.output_dir()
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for index, image in zip(batch["index"].tolist(), images):
            path = folder / f"{index:05d}.png"
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
            files.append(str(path))
        labels = self._labels_for(batch["label"], len(files))
        return {
            "file": files,
            "seed": batch["seed"].cpu().numpy(),
            "class": [self.class_label(int(label)) for label in labels] if labels is not None else ["-"] * len(files),
        }

    # ----- the non-finite guard ---------------------------------------------------------------------
    def check_finite(self, what: str, loss: torch.Tensor, network: nn.Module) -> None:
        """Stop the run (every rank) when ``loss`` or ``network``'s gradients hold NaN/inf, after a
        checkpoint of the current weights. Call it after the backward pass, before the optimizer step.

        One device-to-host copy per call (and one all-reduce under DDP), whatever the number of
        parameters: the gradients are reduced to their largest magnitude (``get_total_norm`` with
        ``norm_type=inf``, which keeps NaN and inf and cannot overflow). Under a loss scaler
        (``16-mixed``) only the loss is checked: an inf gradient there is an overflow of the scaled
        gradients, which the scaler handles itself by skipping that step and lowering its scale.
        """
        checks = {f"{what} loss": loss.detach().float()}
        grads = [p.grad for p in network.parameters() if p.grad is not None]
        if grads and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            checks[f"{what} gradient"] = get_total_norm(grads, norm_type=float("inf")).float()
        finite = torch.isfinite(torch.stack(list(checks.values())))  # the losses are scalars
        bad = not bool(finite.all())
        if self.trainer.world_size > 1:
            bad = bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            return
        culprits = [name for name, ok in zip(checks, finite.tolist()) if not ok]
        what = " and ".join(culprits) if culprits else f"{what} loss or gradient on another rank"
        step = self.trainer.global_step
        callback = self.trainer.checkpoint_callback
        folder = Path(getattr(callback, "dirpath", None) or Path(self.trainer.default_root_dir) / "checkpoints")
        path = folder / f"before-nonfinite-step{step}.ckpt"
        self.trainer.save_checkpoint(path)
        raise NonFiniteLossError(
            f"non-finite {what} at global step {step} (epoch {self.current_epoch}, batch {self.trainer.fit_loop.epoch_loop.batch_idx}); "
            f"training stopped before applying it. The weights from before this step are in {path}; "
            "lower the learning rate or check the data"
        )


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
        in_channels: image channels; linked from the data.
        image_size: image side; linked from the data (a multiple of 4, at least 16).
        num_classes: classes of the data (0: none); linked from the data.
        class_names: class names; linked from the data.
        fid_samples: at most this many generated (and real) images for FID/KID per evaluation.
        kid_subset_size: KID subset size (capped by the number of samples).
        grid_samples: images in the sample grid logged every epoch (0: none).
        extractor_steps: training batches (of 128) of the offline feature extractor.
        extractor_width: width of the offline feature extractor (features = 4 x width).
        extractor_max_images: training images used to train the feature extractor.
        feature_extractor_weights: a saved ``feature_extractor.safetensors`` to use instead of training
            one (makes FIDs of different runs comparable).
        inception_metrics: also compute Inception FID/KID (online users: needs torch-fidelity and the
            weights download).
        cpu_threads: torch intra-op threads while the model runs on CPU (restored afterwards; see
            BaseTask). One thread: these small networks gain little from a second core, and on a
            shared machine contended threads were measured 30x slower; ``null`` keeps torch's choice.
    """

    def __init__(
        self,
        latent_dim: int = 128,
        width: int = 16,
        lr_generator: float = 8e-4,
        lr_discriminator: float = 8e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        conditional: bool = True,
        class_loss_weight: float = 2.0,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 0,
        class_names: list[str] | None = None,
        fid_samples: int = 500,
        kid_subset_size: int = 100,
        grid_samples: int = 24,
        extractor_steps: int = 200,
        extractor_width: int = 16,
        extractor_max_images: int = 5000,
        feature_extractor_weights: str | None = None,
        inception_metrics: bool = False,
        cpu_threads: int | None = 1,
    ) -> None:
        if class_loss_weight < 0:
            raise ValueError(f"class_loss_weight must be >= 0, got {class_loss_weight}")
        super().__init__()
        self.automatic_optimization = False

    def build_networks(self) -> None:
        hp = self.hparams
        self.generator = Generator(hp.latent_dim, hp.image_size, hp.in_channels, hp.width, self.condition_classes)
        classifier = bool(self.condition_classes) and hp.class_loss_weight > 0
        self.discriminator = Discriminator(hp.image_size, hp.in_channels, hp.width, self.condition_classes, classifier)

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
        (d_real, real_logits), (d_fake, _) = self.discriminator(real, labels), self.discriminator(fake, labels)
        d_loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
        if real_logits is not None:
            d_loss = d_loss + self.hparams.class_loss_weight * F.cross_entropy(real_logits, labels)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        self.check_finite("discriminator", d_loss, self.discriminator)
        opt_d.step()
        if not ddp:
            self.untoggle_optimizer(opt_d)
            self.toggle_optimizer(opt_g)
        g_score, fake_logits = self.discriminator(self.generator(z, labels), labels)
        g_loss = -g_score.mean()
        if fake_logits is not None:
            g_loss = g_loss + self.hparams.class_loss_weight * F.cross_entropy(fake_logits, labels)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        self.check_finite("generator", g_loss, self.generator)
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


class Diffusion(GenerativeTask):
    """Denoising diffusion with MONAI's ``DiffusionModelUNet``, DDPM training and DDIM/DDPM sampling.

    Training: MSE of the noise (or velocity) prediction at uniform random timesteps
    (``DiffusionInferer``), optionally min-SNR weighted. An EMA copy of the UNet (``ema_decay``) is
    what samples. ``val/loss`` is the same loss on the validation split
    with fixed noise and timesteps (EMA weights). Class-conditional (class embeddings) when the data
    has labels and ``conditional`` is set.

    Args:
        unet_widths: channels per UNet level (the image side must divide by 2^(levels-1)).
        attention_levels: self-attention per level.
        num_res_blocks: residual blocks per level.
        norm_num_groups: group-norm groups (must divide every width).
        num_head_channels: channels per attention head.
        num_train_timesteps: diffusion steps of the noise schedule.
        schedule: MONAI beta schedule (``linear_beta``, ``scaled_linear_beta``, ``sigmoid_beta``, ``cosine``).
            Defaults (``cosine``, ``epsilon``, ``snr_gamma`` 5), measured on MNIST after 500 batches
            of 64 with DDIM-50 (FID with the digit extractor, 250 images): linear/epsilon/unweighted
            474 (noise), cosine 227, cosine + min-SNR 63; ``v_prediction`` + cosine 10 (better with
            DDIM after minutes of CPU training; not yet made the default).
        prediction_type: what the UNet predicts: ``epsilon`` (the noise) or ``v_prediction`` (the
            velocity ``sqrt(a) * noise - sqrt(1 - a) * image``, Salimans & Ho 2022). The numpy DDIM loop of
            ``domains.media.serving`` samples both.
        snr_gamma: min-SNR-gamma loss weighting (Hang et al. 2023): each timestep's loss is weighted
            so that its image-space weight is ``min(SNR, gamma)`` instead of SNR, which stops the
            nearly noise-free timesteps from dominating training; ``null``: unweighted (plain DDPM).
        sampler: ``ddim`` (deterministic, few steps) or ``ddpm`` (all ``num_train_timesteps`` steps).
        sampling_steps: DDIM steps for ``predict``.
        eval_steps: DDIM steps for the per-epoch grid and FID/KID (cheaper than ``sampling_steps``).
        ema_decay: decay of the EMA weights (warm-up ``min(decay, (1+n)/(10+n))``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``constant``, ``cosine`` or ``step`` (per epoch).
        conditional: condition on class labels when the data has them.
        in_channels: image channels; linked from the data.
        image_size: image side; linked from the data.
        num_classes: classes of the data (0: none); linked from the data.
        class_names: class names; linked from the data.
        fid_samples: at most this many generated (and real) images for FID/KID per evaluation.
        kid_subset_size: KID subset size (capped by the number of samples).
        grid_samples: images in the sample grid logged every epoch (0: none).
        extractor_steps: training batches (of 128) of the offline feature extractor.
        extractor_width: width of the offline feature extractor (features = 4 x width).
        extractor_max_images: training images used to train the feature extractor.
        feature_extractor_weights: a saved ``feature_extractor.safetensors`` to use instead of training one.
        inception_metrics: also compute Inception FID/KID (needs torch-fidelity and the weights download).
        cpu_threads: torch intra-op threads while the model runs on CPU (restored afterwards; ``null``:
            torch's choice).
    """

    def __init__(
        self,
        unet_widths: list[int] = [32, 64, 64],  # noqa: B006 (jsonargparse needs a list default)
        attention_levels: list[bool] = [False, False, True],  # noqa: B006
        num_res_blocks: int = 1,
        norm_num_groups: int = 16,
        num_head_channels: int = 32,
        num_train_timesteps: int = 1000,
        schedule: str = "cosine",
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        snr_gamma: float | None = 5.0,
        sampler: Literal["ddim", "ddpm"] = "ddim",
        sampling_steps: int = 50,
        eval_steps: int = 20,
        ema_decay: float = 0.999,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        conditional: bool = True,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 0,
        class_names: list[str] | None = None,
        fid_samples: int = 500,
        kid_subset_size: int = 100,
        grid_samples: int = 24,
        extractor_steps: int = 200,
        extractor_width: int = 16,
        extractor_max_images: int = 5000,
        feature_extractor_weights: str | None = None,
        inception_metrics: bool = False,
        cpu_threads: int | None = 1,
    ) -> None:
        if not 1 <= sampling_steps <= num_train_timesteps or not 1 <= eval_steps <= num_train_timesteps:
            raise ValueError(f"sampling_steps ({sampling_steps}) and eval_steps ({eval_steps}) must be in [1, num_train_timesteps={num_train_timesteps}]")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 (or null for no weighting), got {snr_gamma}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        super().__init__()

    def build_networks(self) -> None:
        from monai.inferers import DiffusionInferer
        from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

        hp = self.hparams
        self.unet = build_diffusion_unet(
            hp.image_size, hp.in_channels, hp.unet_widths, hp.attention_levels, hp.num_res_blocks, hp.norm_num_groups, hp.num_head_channels, self.condition_classes
        )
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_unet.eval()
        kwargs = {"num_train_timesteps": hp.num_train_timesteps, "schedule": hp.schedule, "prediction_type": hp.prediction_type}
        self.ddpm = DDPMScheduler(**kwargs)
        self.ddim = DDIMScheduler(**kwargs)
        self.inferer = DiffusionInferer(self.ddpm)

    def noise_shape(self) -> tuple[int, ...]:
        return (self.hparams.in_channels, self.hparams.image_size, self.hparams.image_size)

    def eval_sampling_steps(self) -> int | None:
        return self.hparams.eval_steps

    def _net(self, network: nn.Module, labels: torch.Tensor | None) -> Any:
        return partial(network, class_labels=labels) if labels is not None else network

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(noisy, timesteps, class_labels=labels)

    def sample(self, noise: torch.Tensor, labels: torch.Tensor | None, steps: int | None = None, sampler: str | None = None) -> torch.Tensor:
        sampler = sampler or self.hparams.sampler
        if sampler == "ddpm":
            scheduler = self.ddpm
            scheduler.set_timesteps(self.hparams.num_train_timesteps)
        else:
            scheduler = self.ddim
            scheduler.set_timesteps(steps or self.hparams.sampling_steps)
        network = self.ema_unet
        return self.inferer.sample(noise, self._net(network, labels), scheduler=scheduler, verbose=False)

    def export_spec(self, datamodule_state: dict[str, Any] | None) -> ExportSpec:
        """One step of the EMA denoiser: ``noisy (N, C, H, W), timestep (N,) float32 [, labels (N,) int64] -> noise``
        (the velocity for ``prediction_type: v_prediction``; the output keeps the name ``noise``).

        The sampling loop is left to the client: ``domain_metadata.scheduler`` holds the DDPM
        ``alphas_cumprod`` (one per training timestep) and the DDIM timesteps for ``sampling_steps``,
        exactly as MONAI's ``DDIMScheduler`` (eta 0, ``clip_sample`` on, ``set_alpha_to_one`` on,
        ``steps_offset`` 0) uses them; :func:`domains.media.serving.ddim_sample` is a numpy version.
        """
        hp = self.hparams
        module = InferenceDenoiser(self.ema_unet, bool(self.condition_classes))
        count = 4
        noisy = seeded_noise(list(range(count)), self.noise_shape())
        timestep = torch.linspace(0, hp.num_train_timesteps - 1, count).round()
        inputs, names = (noisy, timestep), ["noisy", "timestep"]
        if self.condition_classes:
            inputs, names = (*inputs, torch.arange(count) % self.condition_classes), [*names, "labels"]
        scheduler = ddim_schedule(self.ddim, int(hp.sampling_steps))
        output = "noise (epsilon)" if hp.prediction_type == "epsilon" else "velocity (v)"
        metadata = {**self.export_metadata(), "value_range": [0.0, 1.0], "output_layout": "NCHW", "model_output": output,
                    "model_value_range": [-1.0, 1.0], "scheduler": scheduler}  # fmt: skip
        axes = {name: {0: "batch"} for name in (*names, "noise")}
        return ExportSpec(module, inputs, names, ["noise"], axes, metadata)

    def _denoising_loss(self, network: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(images.shape, generator=generator).to(self.device) if generator else torch.randn_like(images)
        steps = self.hparams.num_train_timesteps
        timesteps = (torch.randint(0, steps, (len(images),), generator=generator) if generator else torch.randint(0, steps, (len(images),))).to(self.device)
        prediction = self.inferer(inputs=images, diffusion_model=self._net(network, labels), noise=noise, timesteps=timesteps)
        target = noise if self.hparams.prediction_type == "epsilon" else self.ddpm.get_velocity(images, noise, timesteps)
        per_image = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, images.ndim)))
        gamma = self.hparams.snr_gamma
        if gamma is not None:
            alpha = self.ddpm.alphas_cumprod.to(self.device)[timesteps].float()
            snr = alpha / (1 - alpha)
            # epsilon loss = SNR x image loss, velocity loss = (SNR + 1) x image loss
            per_image = per_image * snr.clamp(max=gamma) / (snr if self.hparams.prediction_type == "epsilon" else snr + 1)
        return per_image.mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        loss = self._denoising_loss(self.unet, images, self._labels_for(batch["label"], len(images)))
        self.log_train_loss(loss, len(images))
        self._step_loss = loss.detach()
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.check_finite("diffusion", self._step_loss, self.unet)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.trainer.global_step
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))
        ema_update(self.ema_unet, self.unet, decay)

    def train(self, mode: bool = True) -> "Diffusion":
        super().train(mode)
        if hasattr(self, "ema_unet"):
            self.ema_unet.eval()  # the EMA copy only ever samples
        return self

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        images = batch["image"]
        generator = torch.Generator().manual_seed(batch_idx)
        loss = self._denoising_loss(self.ema_unet, images, self._labels_for(batch["label"], len(images)), generator)
        self.log("val/loss", loss, on_epoch=True, batch_size=len(images), sync_dist=True)
        self._update_real(images, batch["label"])
