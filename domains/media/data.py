"""``MediaDataModule``: images for generative models, from a folder, an ``.npz`` or the synthetic shapes set.

Every image is read, checked, resized (shorter side to ``image_size``, centre crop) and given one
channel count when the data module is first asked about the data (the runner asks right after
``__init__``, to link ``in_channels``, ``image_size``, ``num_classes`` and ``class_names`` to the
model), so bad input fails before any training with a ``ValueError`` that names the file. Batches
are ``{"image": float32 (B, C, H, W) in [-1, 1], "label": int64 (B,) (-1 when unlabelled),
"index": int64 (B,)}``; the model's generators also produce [-1, 1] (tanh / clipped diffusion
samples). ``predict`` serves ``num_generate`` seeded generation requests instead of images.

Example:
    >>> dm = MediaDataModule(synthetic_samples=60, image_size=16, batch_size=8)
    >>> dm.in_channels, dm.image_size, dm.num_classes, dm.class_names
    (3, 16, 3, ['circle', 'square', 'triangle'])
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipelines.bundle_runtime import MAX_GUIDANCE
from pipelines.data import AugmentSpec, build_albumentations, make_loader
from pipelines.errors import InputError, did_you_mean
from pipelines.splits import SplitRule, adopt, check_filled, hash_split, hash_unit
from pipelines.reference import KEY as REFERENCE_KEY, fit_output_image_reference
from domains.media.readers import ImageSet, read_image_folder, read_npz, synthetic_images

SPLITS = ("train", "val", "test")
MAX_SEED = 2**63 - 1  # the largest seed of a generated image: seeds are batched as int64 tensors
SAMPLERS = (None, "ddim", "ddpm")  # generate_sampler as a number a DataLoader can batch
#: ``predict`` options only a diffusion model honours (a GAN draws each image in one generator pass): given to a GAN, refused
DIFFUSION_OPTIONS = ("generate_steps", "generate_sampler", "generate_guidance_scale")


def to_model_range(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., H, W, C)`` -> float32 ``(..., C, H, W)`` in [-1, 1]."""
    tensor = torch.as_tensor(np.ascontiguousarray(pixels))
    return tensor.movedim(-1, -3).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``(N, C, H, W)`` in [-1, 1] -> uint8 ``(N, H, W, C)``."""
    scaled = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.movedim(1, -1).cpu().numpy()


class ImageDataset(Dataset):
    """Items ``{"image": (C, H, W) in [-1, 1], "label": int (-1 unlabelled), "index": int}``."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, indices: np.ndarray, augment: Any = None) -> None:
        self.pixels, self.labels, self.indices, self.augment = pixels, labels, indices, augment

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, item: int) -> dict[str, Any]:
        image = self.pixels[item]
        if self.augment is not None:
            out = self.augment(image=image)["image"]
            image = out[..., None] if out.ndim == 2 else out
        return {"image": to_model_range(image), "label": int(self.labels[item]), "index": int(self.indices[item])}


class GenerationRequests(Dataset):
    """``predict`` items: which image to generate (``index``), from which ``seed``, of which class (-1: none),
    with how many sampling steps (0: the model's ``sampling_steps``), which sampler (an index into
    :data:`SAMPLERS`; 0: the model's default) and which classifier-free guidance scale (-1: the model's)."""

    def __init__(self, count: int, seed: int, num_classes: int, steps: int = 0, sampler: int = 0, guidance: float = -1.0) -> None:
        self.count, self.seed, self.num_classes, self.steps, self.sampler, self.guidance = count, seed, num_classes, steps, sampler, guidance

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item: int) -> dict[str, int | float]:
        label = item % self.num_classes if self.num_classes else -1
        return {"index": item, "seed": self.seed + item, "label": label, "steps": self.steps, "sampler": self.sampler, "guidance": self.guidance}


class MediaDataModule(pl.LightningDataModule):
    """Images for GANs and diffusion models.

    Args:
        image_dir: a folder of PNG/JPEG files; images in sub-folders take the sub-folder name as class.
        npz_path: an ``.npz`` holding an image array (``x_train``, ``images``, ... or ``npz_key``); official
            splits are kept: ``x_train/x_val/x_test`` or MedMNIST's ``train_images/val_images/test_images``
            (without a validation array, the test array becomes validation + test).
        npz_key: the name of the image array in ``npz_path`` (default: the first known name).
        image_size: side of the square images the model sees (shorter side resized, centre crop).
        channels: ``1`` (gray) or ``3`` (RGB) to require that count (a file with another count is an
            error that names it); ``null`` to infer it (gray if every image is gray, else RGB).
        use_labels: use class labels (sub-folders, ``y_*`` arrays, synthetic shapes) for
            class-conditional models; ``false`` trains unconditionally.
        class_names: the classes, in label-index order (default: the sub-folder names, sorted, or
            ``0..K-1`` for ``.npz`` labels). Without it, sub-folders spelt alike (``Cat``/``cat``,
            ``cats``/``cat``) or holding one image are refused; with it, a sub-folder not listed is
            refused with the closest listed name (``pipelines.validation.check_labels``).
        val_fraction: validation share when the source has no split.
        test_fraction: test share when the source has no split.
        split_seed: seed of the split and of the subsampling below (the hash salt of ``split_by hash``).
        split_by: ``random`` (default; the source's split when it has one) or ``hash`` (``image_dir``
            only): each image goes to a split by a hash of its file name stem (``cat_001.png`` and
            ``cat_001.jpg`` together), so added images never move earlier ones (:mod:`pipelines.splits`).
        max_train_images: use at most this many training images (``null``: all).
        max_eval_images: use at most this many validation and test images each (the FID reference sets).
        synthetic_samples: size of the embedded shapes set (used when no path is given).
        synthetic_seed: seed of the shapes generator.
        augment: albumentations transforms for training images, as ``[{Name: {args}}]``.
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader worker processes (persistent when > 0); unset: 0 without CUDA, else
            one per spare CPU core per GPU, at most 8 (``pipelines.data.default_workers``).
        pin_memory: pin host memory for GPU copies (default: when CUDA is available).
        num_generate: images ``predict`` generates.
        generate_seed: seed of the first generated image (image ``i`` uses ``generate_seed + i``).
        generate_dir: folder ``predict`` writes the images to (default: ``<run folder>/generated``).
        generate_steps: DDIM steps of diffusion models for ``predict`` (default: the model's
            ``sampling_steps``; at most its ``num_train_timesteps``; refused with ``ddpm`` and for GANs). Generation options are data options because ``predict --ckpt_path``
            takes the model's options from the checkpoint.
        generate_sampler: sampler of diffusion models for ``predict``: ``ddim`` (``generate_steps``
            steps, the default) or ``ddpm`` (all ``num_train_timesteps`` steps); refused for GANs.
        generate_guidance_scale: classifier-free guidance scale of diffusion models for ``predict``
            (default: the model's ``guidance_scale``; anything but 1 needs a model trained with
            ``cond_drop_prob > 0``); refused for GANs.
    """

    def __init__(
        self,
        image_dir: str | None = None,
        npz_path: str | None = None,
        npz_key: str | None = None,
        image_size: int = 32,
        channels: Literal[1, 3] | None = None,
        use_labels: bool = True,
        class_names: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        split_by: Literal["random", "hash"] = "random",
        max_train_images: int | None = None,
        max_eval_images: int | None = 1000,
        synthetic_samples: int = 1536,
        synthetic_seed: int = 0,
        augment: AugmentSpec | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        num_generate: int = 64,
        generate_seed: int = 0,
        generate_dir: str | None = None,
        generate_steps: int | None = None,
        generate_sampler: Literal["ddim", "ddpm"] | None = None,
        generate_guidance_scale: float | None = None,
    ) -> None:
        super().__init__()
        if image_dir and npz_path:
            raise InputError("give either image_dir or npz_path, not both")
        if class_names is not None and (not class_names or len(set(class_names)) != len(class_names)):
            raise InputError(f"--data.class_names must list each class once, got {class_names}")
        if image_size < 8:
            raise InputError(f"--data.image_size must be at least 8 pixels, got {image_size}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if split_by not in ("random", "hash"):
            raise InputError(f"--data.split_by {split_by!r}: media splits by random or hash (of the file name stem)")
        if split_by == "hash" and not image_dir:
            raise InputError("--data.split_by hash splits the files of --data.image_dir by name; .npz and synthetic images have no file names")
        self.split_rule = SplitRule.from_options(split_by, "file name stem" if split_by == "hash" else None, None, None, None, None, val_fraction, test_fraction, split_seed)
        if generate_steps is not None and generate_steps < 1:
            raise InputError(f"generate_steps must be >= 1, got {generate_steps}")
        if generate_steps is not None and generate_sampler == "ddpm":  # it was ignored: DDPM runs every training timestep
            raise InputError(f"--data.generate_steps {generate_steps} with --data.generate_sampler ddpm: DDPM samples every one of the model's "
                             "num_train_timesteps steps, so a number of steps cannot apply; leave --data.generate_steps out, or sample in fewer "
                             "steps with --data.generate_sampler ddim")  # fmt: skip
        if generate_guidance_scale is not None and not (np.isfinite(generate_guidance_scale) and 0 <= generate_guidance_scale <= MAX_GUIDANCE):
            raise InputError(f"--data.generate_guidance_scale must be a number in 0..{MAX_GUIDANCE:g} (1: no guidance; far above a few, samples saturate), got {generate_guidance_scale}")
        if num_generate < 1:
            raise InputError(f"num_generate must be >= 1, got {num_generate}")
        if not 0 <= generate_seed <= MAX_SEED - (num_generate - 1):  # image i uses generate_seed + i, batched as int64
            raise InputError(
                f"--data.generate_seed {generate_seed}: expected a whole number in 0..{MAX_SEED - (num_generate - 1)} "
                f"(2**63 - 1 - (num_generate - 1), num_generate {num_generate}): image i uses seed generate_seed + i, a 64-bit signed integer"
            )
        self.save_hyperparameters(logger=False)
        self.augment = build_albumentations(augment)
        self.datasets: dict[str, Dataset] = {}
        self.restored: dict[str, Any] | None = None  # a checkpoint's state: what the model knows, without reading the source

    # ----- read and checked before training: what the model must know -------------------------
    @cached_property
    def source(self) -> ImageSet:
        hp = self.hparams
        channels = hp.channels or (self.restored.get("in_channels") if self.restored else None)  # a checkpoint's channel count
        if hp.image_dir:
            data = read_image_folder(hp.image_dir, hp.image_size, channels, hp.use_labels, hp.class_names)
        elif hp.npz_path:
            data = read_npz(hp.npz_path, hp.image_size, channels, hp.npz_key, hp.use_labels, hp.class_names)
        else:
            data = synthetic_images(hp.synthetic_samples, hp.image_size, hp.synthetic_seed, channels)
            if hp.class_names is not None and list(hp.class_names) != list(data.class_names):  # the built-in set's classes are fixed
                wrong = [name for name in hp.class_names if name not in data.class_names]
                hints = "".join(did_you_mean(name, data.class_names) for name in wrong)
                raise InputError(
                    f"--data.class_names {list(hp.class_names)}: the built-in synthetic set has the classes {list(data.class_names)}, in this order"
                    f"{hints}; give those (or leave the option out), or point --data.image_dir or --data.npz_path at your own images"
                )
        if not hp.use_labels:
            data.labels, data.class_names = None, []
        saved = (self.restored or {}).get("class_names") or []
        if saved and data.labels is not None and list(data.class_names) != list(saved):
            raise InputError(
                f"the checkpoint was trained on classes {saved} but the data has {list(data.class_names)}; "
                "class-conditional generation needs the same class list (or --data.use_labels false)"
            )
        return data

    @cached_property
    def split_indices(self) -> dict[str, np.ndarray]:
        hp, source = self.hparams, self.source
        rng = np.random.default_rng(hp.split_seed)
        count = len(source.pixels)
        if self.split_rule.stable:  # ordered by hash, so that subsampling below is stable too
            rule = self.split_rule
            stems = [Path(name).stem for name in source.names]
            assignment, unit = hash_split(stems, rule.val_fraction, rule.test_fraction, rule.seed), hash_unit(stems, rule.seed)
            check_filled(assignment, rule, str(hp.image_dir))
            order = np.argsort(unit, kind="stable")
            splits = {name: order[assignment[order] == name] for name in SPLITS}
        elif source.split is not None and (source.split == "val").any():  # official train/val/test arrays
            splits = {name: rng.permutation(np.flatnonzero(source.split == name)) for name in SPLITS}
        elif source.split is not None:
            train = rng.permutation(np.flatnonzero(source.split == "train"))
            held_out = rng.permutation(np.flatnonzero(source.split != "train"))
            half = len(held_out) // 2
            splits = {"train": train, "val": held_out[:half], "test": held_out[half:]}
        else:
            order = rng.permutation(count)
            n_val, n_test = max(1, round(count * hp.val_fraction)), max(1, round(count * hp.test_fraction))
            splits = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        where = hp.image_dir or hp.npz_path or "the synthetic set"
        for name in SPLITS:
            if len(splits[name]) == 0:
                raise InputError(f"{where}: {count} image(s) leave the {name} split empty; at least 3 images are needed")
        if hp.max_train_images:
            splits["train"] = splits["train"][: hp.max_train_images]
        if hp.max_eval_images:
            splits["val"], splits["test"] = splits["val"][: hp.max_eval_images], splits["test"][: hp.max_eval_images]
        return {name: np.sort(indices) for name, indices in splits.items()}

    @property
    def in_channels(self) -> int:
        return int(self.restored["in_channels"]) if self.restored else self.source.channels

    @property
    def image_size(self) -> int:
        return int(self.hparams.image_size)

    @property
    def class_names(self) -> list[str]:
        if self.restored:
            return list(self.restored.get("class_names") or [])
        return list(self.source.class_names) if self.source.labels is not None else []

    @property
    def num_classes(self) -> int:
        """Number of classes for class-conditional models; 0 when the data has no labels."""
        return len(self.class_names)

    def labels_of(self, indices: np.ndarray) -> np.ndarray:
        if self.source.labels is None:
            return np.full(len(indices), -1, dtype=np.int64)
        return self.source.labels[indices]

    def split_tensors(self, split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images in [-1, 1] (N, C, H, W), labels (N,))`` of one split without augmentation."""
        indices = self.split_indices[split][:limit]
        return to_model_range(self.source.pixels[indices]), torch.from_numpy(self.labels_of(indices))

    # ----- loaders -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """The splits the stage uses (``predict`` generates: it reads no images)."""
        wanted = {"predict": (), "test": ("test",), "validate": ("val",)}.get(stage or "", SPLITS)
        for name in (name for name in wanted if name not in self.datasets):
            indices = self.split_indices[name]
            augment = self.augment if name == "train" else None
            self.datasets[name] = ImageDataset(self.source.pixels[indices], self.labels_of(indices), indices, augment)
        hp = self.hparams
        if "predict" not in self.datasets:
            guidance = -1.0 if hp.generate_guidance_scale is None else float(hp.generate_guidance_scale)
            sampler = SAMPLERS.index(hp.generate_sampler)
            self.datasets["predict"] = GenerationRequests(hp.num_generate, hp.generate_seed, self.num_classes, hp.generate_steps or 0, sampler, guidance)

    def _loader(self, name: str, shuffle: bool = False, evaluation: bool = False) -> DataLoader:
        hp = self.hparams
        return make_loader(
            self.datasets[name], hp.batch_size, hp.num_workers, hp.pin_memory, evaluation,
            shuffle=shuffle, drop_last=shuffle and len(self.datasets[name]) > hp.batch_size,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", evaluation=True)  # under DDP each sample scored once (pipelines.data.UnpaddedDistributedSampler)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", evaluation=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def state_dict(self) -> dict[str, Any]:
        if getattr(self, "_reference", None) is None and self.restored is None:  # drift reference of the generated images (pipelines.reference)
            indices = self.split_indices["train"]
            self._reference = fit_output_image_reference(self.source.pixels[indices], "images", f"training split ({len(indices)} images)")
        reference = {REFERENCE_KEY: self._reference} if getattr(self, "_reference", None) is not None else {}
        return {"class_names": self.class_names, "in_channels": self.in_channels, "image_size": self.image_size, "split_rule": self.split_rule.as_dict(), **reference}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reference = state_dict.get(REFERENCE_KEY)
        rule = adopt(self.split_rule, state_dict.get("split_rule"), SplitRule(val_fraction=0.1, test_fraction=0.1))
        if rule != self.split_rule:  # the checkpoint's split rule: the images are split again by it
            self.split_rule = rule
            self.__dict__.pop("split_indices", None)
            self.datasets = {}
        """Loaded before anything reads the data (the runner, ``--ckpt_path``), the checkpoint's classes
        and channels stand in for the source's (``predict`` then reads no image); loaded after, they
        must agree with the data's."""
        if "source" not in self.__dict__ and self.restored is None and "in_channels" in state_dict:
            self.restored = dict(state_dict)
            return
        saved = state_dict.get("class_names") or []
        if saved and self.class_names and saved != self.class_names:
            raise InputError(
                f"the checkpoint was trained on classes {saved} but the data has {self.class_names}; "
                "class-conditional generation needs the same class list (or --data.use_labels false)"
            )
