"""The base of the media models (:class:`GenerativeTask`) and what GAN and diffusion share.

:class:`GenerativeTask` holds the offline FID/KID feature extractor (one per data set, trained once
and cached with the real splits' reference statistics: :mod:`domains.media.metrics`), validation and
test FID/KID (``val/fid_cnn``, the checkpoint monitor, and ``val/kid_cnn``), improved precision and recall and
the memorisation check (:mod:`domains.media.quality`), for conditional models whether the
samples show their class (``val/class_acc_cnn``), a sample grid every epoch
(``plots/val_samples.png``, one copy per epoch under ``plots/samples/``, and W&B), seeded
generation for ``predict`` (PNG files plus prediction rows), and the non-finite loss guard (the run
stops with the step, after saving ``checkpoints/before-nonfinite-step<N>.ckpt`` with the weights
from before it; :class:`pipelines.guards.NonFiniteLossError`, exit status 1).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.utils import get_total_norm

from domains.media.features import (
    CORRUPTIONS, OFFLINE_EXTRACTOR, accuracy, describe, extractor_digest, inception_metrics, load_extractor, save_extractor, train_feature_cnn,
)  # fmt: skip
from domains.media.metrics import extractor_key, inception_range, inception_scores, resolve_extractor, resolve_reference
from domains.media.fit_clock import WholeFitClock
from domains.media.generated_folder import StagedGeneratedFolder, save_png_atomic
from domains.media.networks import FeatureCNN
from domains.media.quality import TrainingNeighbours, offline_scores, training_neighbours
from pipelines.errors import InputError
from pipelines.export_spec import ExportSpec
from pipelines.guards import NonFiniteLossError
from pipelines.plots import image_grid
from pipelines.task import BaseTask
from pipelines.tracking import log_figure


__all__ = ["GenerativeTask", "NonFiniteLossError", "seeded_noise"]


def seeded_noise(seeds: torch.Tensor | list[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per seed: image ``i`` depends only on its own seed."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(rows).to(device)


class GenerativeTask(WholeFitClock, BaseTask):  # max_time counts the extractor's training too (fit_clock.py)
    """Base of the media models: metrics, sample grids, generation, the non-finite guard.

    Subclasses build their networks in ``build_networks`` and implement :meth:`noise_shape`,
    :meth:`sample` and ``training_step``. Their ``__init__`` takes their own arguments and passes the
    shared ones below on with ``super().__init__(**kwargs)``; LightningCLI (jsonargparse) follows that
    call, so ``--help`` of each model lists both and the config keys stay ``model.init_args.<name>``.

    Args:
        conditional: condition on class labels when the data has them.
        in_channels: image channels; linked from the data.
        image_size: image side; linked from the data.
        num_classes: classes of the data (0: none); linked from the data.
        class_names: class names; linked from the data.
        fid_samples: at most this many generated (and real) images for FID/KID per evaluation.
        kid_subset_size: KID subset size (capped by the number of samples).
        grid_samples: images in the sample grid logged every epoch (0: none).
        extractor_steps: training batches (128 real images + 64 corrupted) of the offline feature extractor.
        extractor_width: width of the offline feature extractor (features = 4 x width).
        extractor_max_images: training images used to train the feature extractor.
        feature_extractor_weights: a saved ``feature_extractor.safetensors`` to use instead of the data
            set's cached one.
        extractor_cache: folder of the per-data-set extractors and reference statistics (default:
            ``runs/.feature_extractors`` for run folders ``runs/media/<id>``): the
            first run on a data set trains the extractor there, every later run and test reuses it.
        inception_metrics: also compute Inception FID/KID (``val/fid_inception``; needs torch-fidelity and,
            without ``inception_weights``, the weights download).
        inception_weights: a local copy of torch-fidelity's FID Inception weights (``.pth`` state dict):
            Inception FID/KID from it, no download; checked weights-only before anything is written.
        cpu_threads: torch intra-op threads while the model runs on CPU (restored afterwards; see
            BaseTask). One thread: these small networks gain little from a second core, and on a
            shared machine contended threads were measured 30x slower; ``null`` keeps torch's choice.
    """

    def __init__(
        self,
        conditional: bool = True,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 0,
        class_names: list[str] | None = None,
        fid_samples: int = 500,
        kid_subset_size: int = 100,
        grid_samples: int = 24,
        extractor_steps: int = 300,
        extractor_width: int = 16,
        extractor_max_images: int = 5000,
        feature_extractor_weights: str | None = None,
        extractor_cache: str | None = None,
        inception_metrics: bool = False,
        inception_weights: str | None = None,
        cpu_threads: int | None = 1,
    ) -> None:
        super().__init__()
        self._batch_idx = 0

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

    #: samplers ``--data.generate_sampler`` may name (none: one generator pass)
    samplers: tuple[str, ...] = ()

    def eval_sampling_steps(self) -> int | None:
        return None

    def sampling_plan(self, steps: int | None, sampler: str | None) -> tuple[int | None, str | None]:
        """The steps and sampler ``predict`` really uses (what ``predictions.csv`` records)."""
        return steps, sampler

    @torch.no_grad()
    def generate(self, seeds: list[int] | torch.Tensor, labels: torch.Tensor | None = None, steps: int | None = None, sampler: str | None = None, batch_size: int = 256, **options: Any) -> torch.Tensor:
        """Seeded images ``(N, C, H, W)`` in [-1, 1] (``options``: the model's own, e.g. ``guidance_scale``); the global random state is left untouched."""
        seeds = [int(s) for s in seeds]
        labels = self._labels_for(labels, len(seeds))
        out = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seeds[0] if seeds else 0)
            for start in range(0, len(seeds), batch_size):
                chunk = seeds[start : start + batch_size]
                noise = seeded_noise(chunk, self.noise_shape(), self.device)
                chunk_labels = labels[start : start + batch_size] if labels is not None else None
                out.append(self.sample(noise, chunk_labels, steps, sampler, **options).clamp(-1, 1))
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
        else:
            outputs = hp.num_classes if hp.num_classes >= 2 else 4
            extractor = FeatureCNN(hp.in_channels, outputs + len(CORRUPTIONS), hp.extractor_width)
        self.extractor = extractor.requires_grad_(False)
        self.register_buffer("extractor_ready", torch.tensor(False))
        self._references: dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
        self._neighbours_of: dict[str, TrainingNeighbours] = {}
        wanted = hp.inception_metrics or hp.inception_weights
        self.inception = nn.ModuleList(inception_metrics(hp.kid_subset_size, hp.inception_weights)) if wanted else None

    def extractor_cache_dir(self) -> Path:
        """``extractor_cache``, else ``.feature_extractors/`` two levels above the run folder: ``runs/.feature_extractors``
        for the runner's ``runs/media/<id>`` (outside ``runs/media``, where every folder is a run)."""
        folder = self.hparams.extractor_cache
        return Path(folder) if folder else Path(self.trainer.default_root_dir).resolve().parents[1] / ".feature_extractors"

    def _resolve_extractor(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Rank zero: the data set's extractor (given, cached or trained now and cached) as a state dict and facts."""
        hp = self.hparams
        datamodule = self.trainer.datamodule
        if hp.feature_extractor_weights:
            net, path, trained = load_extractor(hp.feature_extractor_weights, hp.in_channels), str(hp.feature_extractor_weights), False
        else:
            images, labels = datamodule.split_tensors("train", hp.extractor_max_images)
            key = extractor_key(images, labels, {"steps": hp.extractor_steps, "width": hp.extractor_width})

            def train() -> tuple[FeatureCNN, dict]:
                net = train_feature_cnn(images.to(self.device), labels.to(self.device), steps=hp.extractor_steps, width=hp.extractor_width).cpu()
                val_images, val_labels = datamodule.split_tensors("val", 2000)
                score = accuracy(net, val_images, val_labels if net.task == "classes" else None)  # type: ignore[attr-defined]
                return net, {"val_accuracy": round(score, 4), "train_images": len(images), "steps": hp.extractor_steps}

            net, path, trained = resolve_extractor(self.extractor_cache_dir(), key, hp.in_channels, train)
        facts = {"path": path, "trained": trained, "digest": extractor_digest(net), "task": net.task, "task_outputs": net.task_outputs, "recipe": net.recipe}  # type: ignore[attr-defined]
        return {k: v.cpu() for k, v in net.state_dict().items()}, facts

    def _ensure_extractor(self) -> None:
        """Load the data set's extractor once per process (it replaces one from a checkpoint: the extractor
        belongs to the data set, so champion and challenger are scored with the same one)."""
        if getattr(self, "extractor_sha256", None):
            return
        state, facts = self.trainer.strategy.broadcast(self._resolve_extractor() if self.trainer.is_global_zero else None)
        self.extractor.load_state_dict(state)
        describe(self.extractor, facts["task"], facts["task_outputs"], facts["recipe"])
        self.extractor.to(self.device).eval()
        self.extractor_ready.fill_(True)
        self.extractor_sha256 = facts["digest"]
        if self.trainer.is_global_zero:
            copy = save_extractor(self.extractor, Path(self.trainer.default_root_dir) / "feature_extractor.safetensors", {"source": facts["path"]})
            how = "trained now and stored in" if facts["trained"] else "reused from"
            print(f"[media] feature extractor '{OFFLINE_EXTRACTOR}' sha256 {facts['digest'][:16]} ({facts['task']}, {facts['recipe'] or 'no recipe'}) {how} {facts['path']}; copy: {copy}")

    def _reference(self, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Reference statistics of the real ``split`` (computed once per extractor and split, cached) and its labels."""
        if split not in self._references:
            found = None
            if self.trainer.is_global_zero:
                images, labels = self.trainer.datamodule.split_tensors(split)
                stats, path, computed = resolve_reference(self.extractor_cache_dir(), self.extractor, split, images.to(self.device))
                found = (stats, labels)
                print(f"[media] reference statistics of the {split} split ({len(labels)} images) {'computed and stored in' if computed else 'reused from'} {path}")
            self._references[split] = self.trainer.strategy.broadcast(found)
        return self._references[split]

    def on_fit_start(self) -> None:
        self._ensure_extractor()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The measuring networks are the data set's and the weights file's, not the checkpoint's (another width, or
        Inception switched on or off, still loads): the extractor is replaced at fit/test start anyway."""
        state = checkpoint["state_dict"]
        for prefix, module in (("extractor.", self.extractor), ("inception.", self.inception)):
            state = {k: v for k, v in state.items() if not k.startswith(prefix)} | {prefix + k: v for k, v in (module.state_dict() if module is not None else {}).items()}
        checkpoint["state_dict"] = state

    on_validation_start = on_test_start = on_fit_start

    def _update_real(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Real images for the online Inception metrics only; the offline ones use the cached reference."""
        if self.inception is not None:
            for metric in self.inception:
                metric.update(inception_range(images), real=True)

    def _evaluate_samples(self, stage: str) -> None:
        """FID/KID of ``fid_samples`` seeded samples (seeds 10000..., the labels of the real split) against the
        split's cached reference statistics; computed on rank zero and broadcast."""
        if self.trainer.sanity_checking:
            for metric in self.inception or []:
                metric.reset()
            return
        reference, labels = self._reference("val" if stage == "val" else "test")
        count = min(len(labels), self.hparams.fid_samples)
        if count < 2:
            return
        fake, scores = None, None
        if self.trainer.is_global_zero:  # the same noise every epoch: epochs are compared on equal terms
            fake = self.generate(list(range(10_000, 10_000 + count)), labels[:count], steps=self.eval_sampling_steps())
            if stage not in self._neighbours_of:  # the training split's features, cached like a reference
                self._neighbours_of[stage] = training_neighbours(self.extractor_cache_dir(), self.extractor, self.trainer.datamodule, reference["features"])
            scores = offline_scores(self.extractor, stage, reference, fake, labels[:count], self.hparams.kid_subset_size, self.condition_classes, self._neighbours_of[stage])
        scores = self.trainer.strategy.broadcast(scores)
        if self.inception is not None:  # every rank: torchmetrics gathers the real images of all ranks
            scores.update(inception_scores(self.inception, stage, fake, min(self.hparams.kid_subset_size, count)))
        for name, value in scores.items():
            self.log(name, value, sync_dist=False)

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
    def configure_callbacks(self) -> list[pl.Callback]:
        """The generated folder of ``predict``: chosen (and refused when it holds earlier images) before anything is
        generated, filled through a hidden staging folder, complete or absent (:class:`StagedGeneratedFolder`)."""
        attached = [c for c in self.trainer.callbacks if isinstance(c, StagedGeneratedFolder)]  # fit then test: once
        self.generated_folder = attached[0] if attached else StagedGeneratedFolder()
        return [] if attached else [self.generated_folder]

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        from PIL import Image

        from domains.media.data import SAMPLERS, to_uint8

        steps = int(batch["steps"][0]) if "steps" in batch and int(batch["steps"][0]) > 0 else None
        sampler = SAMPLERS[int(batch["sampler"][0])] if "sampler" in batch else None
        if sampler is not None and sampler not in self.samplers:
            raise InputError(f"--data.generate_sampler {sampler}: {type(self).__name__} samples with {', '.join(self.samplers) or 'one generator pass'} only")
        steps, sampler = self.sampling_plan(steps, sampler)
        images = to_uint8(self.generate(batch["seed"].tolist(), batch["label"], steps=steps, sampler=sampler))
        final, staging = self.generated_folder.final, self.generated_folder.staging
        assert final is not None and staging is not None, "predict_step runs inside a predict (StagedGeneratedFolder.on_predict_start)"
        files = []
        for index, image in zip(batch["index"].tolist(), images):
            save_png_atomic(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), staging / f"{index:05d}.png")
            files.append(str(final / f"{index:05d}.png"))  # its name once the staging folder is renamed after the last batch
        labels = self._labels_for(batch["label"], len(files))
        return {
            "file": files,
            "seed": batch["seed"].cpu().numpy(),
            "class": [self.class_label(int(label)) for label in labels] if labels is not None else ["-"] * len(files),
            "sampler": [sampler or "generator"] * len(files),
            "steps": [steps or 1] * len(files),
        }

    # ----- the non-finite guard ---------------------------------------------------------------------
    def check_finite(self, what: str, loss: torch.Tensor, network: nn.Module, batch_idx: int) -> None:
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
            f"non-finite {what} at global step {step} (epoch {self.current_epoch}, batch {batch_idx}); "
            f"training stopped before applying it. The weights from before this step are in {path}; "
            "lower the learning rate or check the data"
        )
