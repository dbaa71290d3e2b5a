"""The diffusion model of the media domain: MONAI's ``DiffusionModelUNet``, DDPM training, EMA, DDIM/DDPM sampling."""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from domains.media.diffusion_networks import GuidedDenoiser, InferenceDenoiser, build_diffusion_unet
from domains.media.networks import ema_decay_at, ema_update
from domains.media.task import GenerativeTask, seeded_noise
from pipelines.bundle_runtime import MAX_GUIDANCE
from pipelines.errors import InputError
from pipelines.evaluation_means import EvaluationMeans
from pipelines.export_spec import ExportSpec
from pipelines.sample_draws import normal_per_sample, uniform_per_sample

#: what each evaluation draw is for (the ``salt`` of :mod:`pipelines.sample_draws`)
EVALUATION_NOISE, EVALUATION_TIMESTEP = 1, 2


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


def check_guidance(cond_drop_prob: float, guidance_scale: float, conditional: bool, option: str) -> None:
    """Refuse (``InputError``) a condition-dropout probability outside [0, 1) and a guidance scale the model cannot apply."""
    if not 0.0 <= cond_drop_prob < 1.0:
        raise InputError(f"--model.init_args.cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
    if not math.isfinite(guidance_scale) or not 0 <= guidance_scale <= MAX_GUIDANCE:
        raise InputError(f"{option} must be a number in 0..{MAX_GUIDANCE:g} (1: no guidance; far above a few, samples saturate), got {guidance_scale}")
    if guidance_scale != 1.0 and not conditional:
        raise InputError(f"{option} {guidance_scale}: classifier-free guidance needs a class-conditional model (labelled data, conditional: true); use 1")
    if guidance_scale != 1.0 and cond_drop_prob == 0:
        raise InputError(
            f"{option} {guidance_scale}: this model was trained without a null class (cond_drop_prob 0), so it has no unconditional "
            "prediction to guide with; use 1, or train with --model.init_args.cond_drop_prob 0.1"
        )


class Diffusion(GenerativeTask):
    """Denoising diffusion with MONAI's ``DiffusionModelUNet``, DDPM training and DDIM/DDPM sampling.

    Training: MSE of the noise (or velocity) prediction at uniform random timesteps
    (``DiffusionInferer``), optionally min-SNR weighted. An EMA copy of the UNet (``ema_decay``) is
    what samples. ``val/loss`` is the same loss on the validation split (EMA weights), each image's
    noise and timestep drawn from a generator seeded by the image's index (:mod:`pipelines.sample_draws`): the
    score of a checkpoint is a function of the data alone, not of the batch size, the order or the process count. Class-conditional (class embeddings) when the data
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
        sampling_steps: DDIM steps for ``predict`` (``--data.generate_steps`` overrides it; the sampler
            is ``--data.generate_sampler``: a data option, since ``predict --ckpt_path`` replaces the
            model's options with the checkpoint's, which silently dropped the former
            ``--model.init_args.sampler``).
        eval_steps: DDIM steps for the per-epoch grid and FID/KID (cheaper than ``sampling_steps``).
        ema_decay: decay of the EMA weights (warm-up ``min(decay, (1+n)/(10+n))``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``constant``, ``cosine`` or ``step`` (per epoch).
        cond_drop_prob: classifier-free guidance (Ho & Salimans 2022): during training each image's
            class is replaced by a learned null class with this probability, so the same UNet also
            learns the unconditional model (the UNet gets one class embedding more). ``0``: no null
            class, no guidance (checkpoints from before this option load unchanged).
        guidance_scale: classifier-free guidance scale ``w`` of the validation/test samples (and the
            default of ``predict``, ``--data.generate_guidance_scale``, and of exported bundles):
            the model output is ``uncond + w * (cond - uncond)``; ``1`` is the plain conditional
            model (one UNet call per step), ``0`` the unconditional one, above 1 stronger class
            adherence (two UNet calls per step). Anything but 1 needs ``cond_drop_prob > 0``.
        kwargs: the arguments every media model shares (:class:`GenerativeTask`).
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
        sampling_steps: int = 50,
        eval_steps: int = 20,
        ema_decay: float = 0.999,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        cond_drop_prob: float = 0.0,
        guidance_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        conditional = kwargs.get("conditional", True) and kwargs.get("num_classes", 0) > 0
        check_guidance(cond_drop_prob, guidance_scale, conditional, "--model.init_args.guidance_scale")
        if not 1 <= sampling_steps <= num_train_timesteps or not 1 <= eval_steps <= num_train_timesteps:
            raise ValueError(f"sampling_steps ({sampling_steps}) and eval_steps ({eval_steps}) must be in [1, num_train_timesteps={num_train_timesteps}]")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 (or null for no weighting), got {snr_gamma}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if "sampler" in kwargs:  # a checkpoint from before generate_sampler (the CLI refuses the unknown option)
            raise ValueError("sampler is not a model option (predict --ckpt_path replaces model options with the checkpoint's): use --data.generate_sampler ddim|ddpm")
        super().__init__(**kwargs)

    samplers = ("ddim", "ddpm")

    def sampling_plan(self, steps: int | None, sampler: str | None) -> tuple[int | None, str | None]:
        sampler = sampler or "ddim"
        return (self.hparams.num_train_timesteps if sampler == "ddpm" else steps or self.hparams.sampling_steps), sampler

    def check_predict_data(self, datamodule: Any) -> None:
        """``predict``'s generation options against this model, before anything is written (:mod:`pipelines.cli`): DDIM
        takes at most ``num_train_timesteps`` steps (more crashed mid-predict, exit 1), and guidance needs a null class."""
        hp = datamodule.hparams
        steps, limit = hp.get("generate_steps"), self.hparams.num_train_timesteps
        if steps is not None and steps > limit:
            raise InputError(f"--data.generate_steps {steps}: this model was trained with num_train_timesteps {limit}, so DDIM samples it in at most "
                             f"{limit} steps; give --data.generate_steps {limit} or fewer (default: its sampling_steps, {self.hparams.sampling_steps})")  # fmt: skip
        if hp.get("generate_guidance_scale") is not None:
            self._guidance_for(float(hp.generate_guidance_scale))

    def build_networks(self) -> None:
        from monai.inferers import DiffusionInferer
        from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

        hp = self.hparams
        classes = self.condition_classes + (1 if self.null_label is not None else 0)  # the null class of guidance is the last
        self.unet = build_diffusion_unet(
            hp.image_size, hp.in_channels, hp.unet_widths, hp.attention_levels, hp.num_res_blocks, hp.norm_num_groups, hp.num_head_channels, classes
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

    @property
    def null_label(self) -> int | None:
        """The class index that stands for "no class" (classifier-free guidance), or ``None`` without guidance training."""
        return self.condition_classes if self.condition_classes and self.hparams.cond_drop_prob > 0 else None

    def _net(self, network: nn.Module, labels: torch.Tensor | None, guidance_scale: float = 1.0) -> Any:
        if labels is None:
            return network
        if guidance_scale != 1.0:
            return GuidedDenoiser(network, labels, self.null_label, guidance_scale)
        return partial(network, class_labels=labels)

    def _training_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Labels with each one replaced by the null class with probability ``cond_drop_prob`` (training only)."""
        if labels is None or self.null_label is None:
            return labels
        dropped = torch.rand(labels.shape, device=labels.device) < self.hparams.cond_drop_prob
        return torch.where(dropped, torch.full_like(labels, self.null_label), labels)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(noisy, timesteps, class_labels=labels)

    def sample(
        self, noise: torch.Tensor, labels: torch.Tensor | None, steps: int | None = None, sampler: str | None = None, guidance_scale: float | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1]; ``guidance_scale`` defaults to the one ``predict`` asked for, else the model's."""
        if sampler not in (None, *self.samplers):
            raise ValueError(f"sampler must be one of {self.samplers}, got {sampler!r}")
        scale = self._guidance_for(guidance_scale)
        if sampler == "ddpm":
            scheduler = self.ddpm
            scheduler.set_timesteps(self.hparams.num_train_timesteps)
        else:
            scheduler = self.ddim
            scheduler.set_timesteps(steps or self.hparams.sampling_steps)
        return self.inferer.sample(noise, self._net(self.ema_unet, labels, scale), scheduler=scheduler, verbose=False)

    def _guidance_for(self, guidance_scale: float | None) -> float:
        scale = guidance_scale if guidance_scale is not None else getattr(self, "_predict_guidance", None)
        scale = float(self.hparams.guidance_scale if scale is None else scale)
        check_guidance(self.hparams.cond_drop_prob, scale, bool(self.condition_classes), "--data.generate_guidance_scale")
        return scale

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """:meth:`GenerativeTask.predict_step` with ``--data.generate_guidance_scale`` (a data option, as the sampler)."""
        requested = float(batch["guidance"][0]) if "guidance" in batch and float(batch["guidance"][0]) >= 0 else None
        self._predict_guidance = scale = self._guidance_for(requested)
        try:
            rows = super().predict_step(batch, batch_idx)
        finally:
            self._predict_guidance = None
        return {**rows, "guidance_scale": [scale if self.condition_classes else "-"] * len(rows["file"])}

    def export_spec(self, datamodule_state: dict[str, Any] | None) -> ExportSpec:
        """One step of the EMA denoiser: ``noisy (N, C, H, W), timestep (N,) float32 [, labels (N,) int64] -> noise``
        (the velocity for ``prediction_type: v_prediction``; the output keeps the name ``noise``).

        The sampling loop is left to the client: ``domain_metadata.scheduler`` holds the DDPM
        ``alphas_cumprod`` (one per training timestep) and the DDIM timesteps for ``sampling_steps``,
        exactly as MONAI's ``DDIMScheduler`` (eta 0, ``clip_sample`` on, ``set_alpha_to_one`` on,
        ``steps_offset`` 0) uses them; :func:`pipelines.bundle_runtime.ddim_sample` is a numpy version.
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
        if self.null_label is not None:  # classifier-free guidance: the sampling loop calls the step with the null class too
            scheduler["guidance"] = {"null_label": int(self.null_label), "guidance_scale": float(hp.guidance_scale)}
        output = "noise (epsilon)" if hp.prediction_type == "epsilon" else "velocity (v)"
        metadata = {**self.export_metadata(), "value_range": [0.0, 1.0], "output_layout": "NCHW", "model_output": output,
                    "model_value_range": [-1.0, 1.0], "scheduler": scheduler}  # fmt: skip
        axes = {name: {0: "batch"} for name in (*names, "noise")}
        return ExportSpec(module, inputs, names, ["noise"], axes, metadata)

    def _denoising_loss(
        self, network: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:  # fmt: skip
        """The mean (min-SNR weighted) denoising loss of ``images``; noise and timesteps are drawn from the global
        generator in training, and per image from its index (``indices``, the batch's ``index``) in evaluation."""
        steps = self.hparams.num_train_timesteps
        if indices is None:
            noise, timesteps = torch.randn_like(images), torch.randint(0, steps, (len(images),)).to(self.device)
        else:  # a function of the image alone: the same in any batch (size, order, rank)
            noise = normal_per_sample(indices, tuple(images.shape[1:]), EVALUATION_NOISE, images.device, images.dtype)
            timesteps = (uniform_per_sample(indices, (), EVALUATION_TIMESTEP, dtype=torch.float64) * steps).long().clamp(max=steps - 1).to(self.device)
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
        loss = self._denoising_loss(self.unet, images, self._training_labels(self._labels_for(batch["label"], len(images))))
        self.log_train_loss(loss, len(images))
        self._step_loss = loss.detach()
        self._batch_idx = batch_idx
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.check_finite("diffusion", self._step_loss, self.unet, self._batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        ema_update(self.ema_unet, self.unet, ema_decay_at(self.hparams.ema_decay, self.trainer.global_step))

    def train(self, mode: bool = True) -> "Diffusion":
        super().train(mode)
        if hasattr(self, "ema_unet"):
            self.ema_unet.eval()  # the EMA copy only ever samples
        return self

    def configure_metrics(self) -> None:
        super().configure_metrics()
        self.evaluation_means = EvaluationMeans(["val/loss"])  # exact over every process's images

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        images = batch["image"]
        loss = self._denoising_loss(self.ema_unet, images, self._labels_for(batch["label"], len(images)), batch["index"])
        self.evaluation_means.log(self, "val/loss", loss, len(images))  # a mean over the images
        self._update_real(images, batch["label"])
