"""``MedicalImageDataModule``: medical images from the synthetic set, MedMNIST ``.npz`` or an image table.

Everything the model must know about the data (classes, channels, 2-D or 3-D, task, class
weights) is read from the source when the data module is built, before any training, and linked to
the model by the runner. Pixels are read and checked in :meth:`setup`; every problem is raised as a
``ValueError`` that names the file, row or option. Normalisation statistics are fitted on the
training split and saved in the checkpoint (:meth:`state_dict`). With ``streaming`` the pixels are
never all in memory: each image is read when the loader asks for it, or from a memory-mapped pixel
cache (:mod:`domains.healthcare.lazy_pixels`, :mod:`domains.healthcare.pixel_cache`).

Example:
    >>> dm = MedicalImageDataModule(synthetic_samples=60, batch_size=8)
    >>> dm.num_classes, dm.in_channels, dm.spatial_dims, dm.task
    (3, 1, 2, 'multiclass')
"""

from __future__ import annotations

import sys
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from pipelines.cache_folders import check_cache_dir
from pipelines.data import AugmentSpec, build_albumentations, default_workers, make_loader
from pipelines.errors import InputError
from domains.healthcare.intensity_watch import IntensityWatch
from pipelines.reference import KEY as REFERENCE_KEY
from pipelines.splits import SplitRule, adopt
from pipelines.images import Intensity, IntensityMode
from domains.healthcare.datasets import ImageDataset, build_volume_augmentation
from domains.healthcare.shards import ImageShards, option_defaults
from domains.healthcare.lazy_pixels import TrainingStatistics, block_items, blocks_of
from domains.healthcare.pixel_reading import TRAINING_PIXELS, SplitPixels
from domains.healthcare.split_assignment import assign_splits
from domains.healthcare.splitting import stratified_split  # noqa: F401 (imported from here by tests/test_healthcare.py)
from domains.healthcare.readers import SPLITS, LabeledImages, read_image_table, read_medmnist_npz, synthetic_lesions


class MedicalImageDataModule(pl.LightningDataModule):
    """Medical image classification data.

    Args:
        npz_path: a MedMNIST ``.npz`` (official splits).
        labels_csv: a CSV with ``path``, ``label`` and optional ``split`` columns (``a|b`` = multi-label).
        image_dir: folder the CSV's paths are relative to (default: the CSV's folder).
        predict_dir: a folder of unlabelled images to classify with ``predict`` (default: the test split).
        class_names: the class list, in label-index order (default: from the data). Labels spelt alike
            or classes with fewer than 2 items are refused unless listed here; labels outside it are refused.
        positive_class: the positive class of a binary task (``prob_<name>``, AUROC and F1 are about it).
            Default: the other name when one means "no finding" (normal, negative, benign, ``0``...),
            else the second of ``class_names``; otherwise the data is refused (``domains/healthcare/labels.py``).
        intensity: how stored pixel values become [0, 1] (``pipelines/images.py``): ``bit_depth``
            (integers / (2**bits - 1); floats must be in [0, 1]), ``dicom_window`` (each DICOM's
            WindowCenter/WindowWidth), ``range`` (``intensity_range``) or ``minmax`` (per image).
        intensity_range: ``[LOW, HIGH]`` mapped to [0, 1] and clipped, after the DICOM Modality LUT
            (Hounsfield units for CT: ``[-1024, 3071]`` keeps the whole range); selects ``range``.
        task: ``binary``, ``multiclass`` or ``multilabel`` (default: inferred from the labels).
        image_size: resize every image to this size per spatial axis (MONAI ``Resize``); required when
            the files differ in size. At least 1 here; the model refuses sizes below what its
            network needs (8 for a small-stem ResNet, 32 for the others).
        split: ``official`` uses the source's split when it has one; ``stratified`` always re-splits.
        val_fraction: validation share of a stratified split.
        test_fraction: test share of a stratified split.
        split_seed: seed of the stratified split (the hash salt of ``split_by hash``).
        split_by: ``random`` (default: ``split`` above) or ``hash``: each value of ``split_key`` (a
            labels CSV column, e.g. ``patient_id``) goes to a split by a hash of it, so all images
            of one patient stay together and added rows never move earlier ones (:mod:`pipelines.splits`).
        split_key: the labels CSV column ``split_by hash`` hashes.
        group_column: a labels CSV column (e.g. ``patient_id``) whose values must not cross splits:
            any split (official, stratified or hashed) with a patient in two splits is refused.
        synthetic_samples: size of the embedded synthetic set (used when no path is given).
        synthetic_image_size: side of the synthetic images.
        synthetic_seed: seed of the synthetic generator.
        balance: ``class_weights`` (weighted loss), ``sampler`` (weighted sampling) or ``none``.
        augment: albumentations transforms for 2-D training images, as ``[{Name: {args}}]``.
        volume_augment: MONAI random flips and noise for 3-D training volumes.
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader worker processes (persistent when > 0); unset: 0 without CUDA, else
            one per spare CPU core per GPU, at most 8 (``pipelines.data.default_workers``).
        pin_memory: pin host memory for GPU copies (default: when CUDA is available).
        streaming: images larger than memory: each is read (decoded, checked, resized) when the loader asks
            for it, by its workers in parallel; setup reads every image of the stage's splits once to
            check it and fits the statistics in that pass (:mod:`domains.healthcare.lazy_pixels`).
            ``.npz`` and synthetic pixels stay in memory as read; their resized copies are not made.
        cache_dir: with ``streaming``, keep the decoded pixels in a memory-mapped cache in this folder, keyed by
            the files' content and the transform (:mod:`domains.healthcare.pixel_cache`): later runs decode
            no image (each file's bytes are hashed to find the cache). Default: no cache.
        shards: a folder of webdataset shards written by ``python -m domains.healthcare.shards_write``: the splits,
            classes and fitted statistics come from its manifest; under DDP each process reads only its own shards
            (:mod:`domains.healthcare.shards`, :mod:`pipelines.shards`).
    """

    def __init__(
        self,
        npz_path: str | None = None,
        labels_csv: str | None = None,
        image_dir: str | None = None,
        predict_dir: str | None = None,
        class_names: list[str] | None = None,
        positive_class: str | None = None,
        intensity: IntensityMode | None = None,
        intensity_range: tuple[float, float] | None = None,
        task: Literal["binary", "multiclass", "multilabel"] | None = None,
        image_size: int | None = None,
        split: Literal["official", "stratified"] = "official",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        split_by: Literal["random", "hash"] = "random",
        split_key: str | None = None,
        group_column: str | None = None,
        synthetic_samples: int = 900,
        synthetic_image_size: int = 32,
        synthetic_seed: int = 0,
        balance: Literal["class_weights", "sampler", "none"] = "class_weights",
        augment: AugmentSpec | None = None,
        volume_augment: bool = True,
        batch_size: int = 64,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        streaming: bool = False,
        cache_dir: str | None = None,
        shards: str | None = None,
    ) -> None:
        super().__init__()
        check_cache_dir(cache_dir, streaming)
        if npz_path and labels_csv:
            raise InputError("give either --data.npz_path or --data.labels_csv, not both")
        if batch_size < 1:
            raise InputError(f"--data.batch_size must be >= 1, got {batch_size}")
        if image_size is not None and image_size < 1:
            raise InputError(f"--data.image_size must be a positive number of pixels per side, got {image_size}")
        if class_names is not None and len(set(class_names)) != len(class_names):
            raise InputError(f"--data.class_names lists a class twice: {class_names}")
        if split_by not in ("random", "hash"):
            raise InputError(f"--data.split_by {split_by!r}: healthcare splits by random or hash (the labels CSV's split column is used by --data.split official)")
        self.split_rule = SplitRule.from_options(split_by, split_key, None, None, None, None, val_fraction, test_fraction, split_seed)
        if (split_key or group_column) and not labels_csv:
            raise InputError("--data.split_key and --data.group_column name a column of --data.labels_csv; .npz and synthetic data have none")
        self.intensity = Intensity.from_options(intensity, intensity_range)
        if self.intensity.mode != "bit_depth" and not labels_csv and not predict_dir:
            raise InputError(f"--data.intensity {self.intensity.mode} applies to image files (--data.labels_csv, --data.predict_dir); .npz and synthetic pixels are read by bit depth")
        self.save_hyperparameters(logger=False)  # the full config is logged by the runner; avoids key clashes
        self.augment = build_albumentations(augment)  # validated now, before any training
        self.datasets: dict[str, ImageDataset] = {}
        self.channel_mean: list[float] | None = None
        self.reference: dict[str, Any] | None = None  # drift reference statistics (pipelines.reference), fitted in setup
        self.intensity_watch: IntensityWatch | None = None  # predict: images outside the training range of brightness
        self.channel_std: list[float] | None = None
        self.restored: dict[str, Any] | None = None  # a checkpoint's state: what the model knows, without reading the source
        self.shard_set = ImageShards(shards, self.hparams, option_defaults(type(self))) if shards else None  # checked now: manifest, options beside it
        if self.shard_set is not None:  # what the writer fitted on the training split, taken as a checkpoint's would be
            self.restored, self.split_rule = dict(self.shard_set.state), adopt(self.split_rule, self.shard_set.state["split_rule"], SplitRule())
            self.channel_mean, self.channel_std, self.reference = self.restored["channel_mean"], self.restored["channel_std"], self.restored[REFERENCE_KEY]

    # ----- what the model needs to know, read before training -------------------------------
    @cached_property
    def source(self) -> LabeledImages:
        hp = self.hparams
        # a checkpoint's classes, in its order: evaluation data is read against the classes the model knows
        class_names = hp.class_names or (self.restored["class_names"] if self.restored else None)
        positive_class = hp.positive_class or (self.restored.get("positive_class") if self.restored else None)
        if hp.npz_path:
            data = read_medmnist_npz(hp.npz_path, class_names, positive_class)
        elif hp.labels_csv:
            data = read_image_table(hp.labels_csv, hp.image_dir, class_names, positive_class, self.intensity)
        else:
            data = synthetic_lesions(hp.synthetic_samples, hp.synthetic_image_size, hp.synthetic_seed)
        if hp.positive_class is not None and data.task != "binary":
            raise InputError(f"--data.positive_class {hp.positive_class!r} is for binary tasks; this data is {data.task} with classes {data.class_names}")
        if data.task == "binary":
            print(f"[healthcare] binary task: positive class {data.class_names[1]!r} ({data.positive_reason}); prob_{data.class_names[1]}, AUROC and F1 are about it", file=sys.stderr)
        if hp.task is not None and hp.task != data.task:
            if {hp.task, data.task} != {"binary", "multiclass"} or (hp.task == "binary" and len(data.class_names) != 2):
                raise InputError(f"--data.task {hp.task!r} does not fit the labels, which look {data.task!r}")
            data.task = hp.task
        return data

    @cached_property
    def split_assignment(self) -> np.ndarray:
        """Each item's split (:mod:`domains.healthcare.split_assignment`)."""
        return assign_splits(self.source, self.split_rule, self.hparams)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.restored["class_names"]) if self.restored else list(self.source.class_names)

    @property
    def task(self) -> str:
        return self.restored["task"] if self.restored else self.source.task

    @property
    def positive_class(self) -> str | None:
        """The positive class of a binary task (index 1), else ``None``."""
        return self.class_names[1] if self.task == "binary" else None

    @property
    def in_channels(self) -> int:
        return self.image_shape[0] if self.restored else self.source.in_channels

    @property
    def spatial_dims(self) -> int:
        return len(self.image_shape) - 1 if self.restored else self.source.spatial_dims

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Channel-first shape of one model input."""
        if self.restored:
            return tuple(self.restored["image_shape"])
        size = self.hparams.image_size
        spatial = (size,) * self.spatial_dims if size else self.source.sample_shape[1:]
        return (self.in_channels, *spatial)

    @property
    def class_weights(self) -> list[float] | None:
        """Loss weights from the training split: ``N / (C * count)`` per class, or the positive weight
        ``negatives / positives`` (per label) for binary and multi-label tasks."""
        if self.hparams.balance != "class_weights":
            return None
        if self.restored and "class_weights" in self.restored:
            return self.restored["class_weights"]
        labels = self.source.labels[self.split_assignment == "train"]
        if self.task == "multiclass":
            counts = np.bincount(labels, minlength=self.num_classes).astype(float)
            return [float(len(labels) / (self.num_classes * max(c, 1.0))) for c in counts]
        pos = labels.sum(0).astype(float)  # (N,) binary -> scalar; (N, K) multi-label -> per label
        return np.atleast_1d((len(labels) - pos) / np.maximum(pos, 1.0)).astype(float).tolist()

    # ----- pixels ----------------------------------------------------------------------------
    def _resize(self) -> Any:
        if not self.hparams.image_size:
            return None
        from monai.transforms import Resize

        return Resize(spatial_size=self.image_shape[1:], mode="area")

    def _splits_for(self, stage: str | None) -> tuple[str, ...]:
        """The splits a stage reads: ``predict`` on ``predict_dir`` and anything run from a checkpoint's
        statistics read no training images."""
        return {"predict": () if self.hparams.predict_dir else ("test",), "test": ("test",), "validate": ("val",)}.get(stage or "", SPLITS)

    def setup(self, stage: str | None = None) -> None:
        """Read the pixels of the splits the stage uses (once per split; decoded into memory, or checked and
        served lazily with ``streaming``); the normalisation statistics come from the training split, or
        from the checkpoint without reading it."""
        wanted = [name for name in self._splits_for(stage) if name not in self.datasets]
        if self.channel_mean is None and "train" not in wanted and "train" not in self.datasets:
            wanted.insert(0, "train")  # statistics to fit (no checkpoint)
        volume = self.spatial_dims == 3
        if volume:
            augment = build_volume_augmentation() if self.hparams.volume_augment else None
        else:
            augment = self.augment
            if augment is not None:  # albumentations 2 has its own generator: seed it from the run's seed
                augment.set_random_seed(torch.initial_seed() % 2**32)
        statistics = TrainingStatistics() if self.channel_mean is None or self.reference is None else None
        for name in wanted:
            if self.shard_set is not None:
                self.datasets[name] = self.shard_set.split(name, augment if name == "train" else None, volume)  # type: ignore[assignment]
                continue
            indices = np.flatnonzero(self.split_assignment == name)
            images = self.pixels.split(indices, statistics if name == "train" else None)
            self.datasets[name] = ImageDataset(images, self.source.labels[indices], indices, augment if name == "train" else None, volume)
        if self.hparams.predict_dir and stage in (None, "predict") and "predict" not in self.datasets:
            files, images = self.pixels.unlabelled(Path(self.hparams.predict_dir), self.value_units)
            self.predict_files = [str(p) for p in files]
            self.datasets["predict"] = ImageDataset(images, np.full(len(files), -1), np.arange(len(files)))
        if statistics is not None and "train" in self.datasets:
            if not statistics.images:  # not fitted while the split was read: one pass over it
                for block in blocks_of(self.datasets["train"].images, block_items(self.image_shape)):
                    statistics.add(block, TRAINING_PIXELS)
            if self.channel_mean is None:
                self.channel_mean, self.channel_std = statistics.channels()
            if self.reference is None:  # drift reference (pipelines.reference): the training split's intensities
                self.reference = statistics.reference("image", f"{self._source_label()} training split")

    def _source_label(self) -> str:
        hp = self.hparams
        return str(hp.get("npz_path") or hp.get("labels_csv") or hp.get("image_dir") or "synthetic images")

    @cached_property
    def pixels(self) -> SplitPixels:
        """Where the splits' pixels come from (:mod:`domains.healthcare.pixel_reading`)."""
        hp = self.hparams
        return SplitPixels(lambda: self.source, self.image_shape, self._resize(), self.intensity, hp.streaming, hp.cache_dir, hp.num_workers, self._source_label())

    def _loader(self, name: str, shuffle: bool = False, sampler: Any = None, evaluation: bool = False) -> DataLoader:
        hp = self.hparams
        if self.shard_set is not None and name != "predict":
            return self.shard_set.loader(self.datasets[name], self.trainer, hp.batch_size, default_workers(hp.num_workers), hp.pin_memory, shuffle, torch.initial_seed())
        return make_loader(self.datasets[name], hp.batch_size, hp.num_workers, hp.pin_memory, evaluation, shuffle=shuffle and sampler is None, sampler=sampler)

    def check_processes(self, processes: int) -> None:
        """Shards too few for ``processes`` DDP processes are refused (the runner asks before anything is written)."""
        if self.shard_set is not None:
            self.shard_set.check_processes(processes, self.datasets, self.hparams.batch_size, default_workers(self.hparams.num_workers))

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.hparams.balance == "sampler":
            labels = self.datasets["train"].labels
            strata = labels.argmax(1) if labels.ndim == 2 else labels
            weights = 1.0 / np.bincount(strata)[strata]
            sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=len(strata))
        return self._loader("train", shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", evaluation=True)  # under DDP each sample scored once (pipelines.data.UnpaddedDistributedSampler)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", evaluation=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if "predict" in self.datasets else "test")

    def item_name(self, index: int) -> str:
        """Human-readable id of an item from the ``index`` field of a batch (file path or split/number)."""
        if "predict" in self.datasets and self.trainer is not None and self.trainer.predicting:
            return self.predict_files[index]
        return self.shard_set.names[index] if self.shard_set is not None else self.source.names[index]

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Normalise on the device with the statistics fitted on the training split."""
        assert self.channel_mean is not None and self.channel_std is not None
        image = batch["image"]
        if self.trainer is not None and self.trainer.predicting:  # images unlike every training image are said at the end (intensity_watch.py)
            self.intensity_watch = self.intensity_watch or IntensityWatch(self.reference)
            self.intensity_watch.update(image, lambda i: self.item_name(int(batch["index"][i])) if "index" in batch else i)
        shape = (1, -1) + (1,) * (image.ndim - 2)
        mean = torch.tensor(self.channel_mean, device=image.device, dtype=image.dtype).view(shape)
        std = torch.tensor(self.channel_std, device=image.device, dtype=image.dtype).view(shape)
        batch["image"] = (image - mean) / std
        return batch

    def teardown(self, stage: str) -> None:
        if stage == "predict" and self.intensity_watch is not None:
            self.intensity_watch.warn()
            self.intensity_watch = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "class_names": self.class_names,
            "positive_class": self.positive_class,
            "task": self.task,
            "image_shape": list(self.image_shape),
            "channel_mean": self.channel_mean,
            "channel_std": self.channel_std,
            REFERENCE_KEY: self.reference,
            "split_rule": self.split_rule.as_dict(),
            "class_weights": self.class_weights,
            "value_units": self.value_units,
        }

    @property
    def value_units(self) -> str | None:
        """With ``--data.intensity range``: the kind of values the training files store (``pipelines.images.value_units``), which
        ``predict_dir`` files must share; ``None`` otherwise (and in checkpoints written before it was recorded)."""
        if self.restored:
            return self.restored.get("value_units")
        return self.source.units if "source" in self.__dict__ else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take a checkpoint's classes, input shape, normalisation statistics and split rule. Loaded before anything
        reads the data (the runner, ``--ckpt_path``), they make the source unnecessary for ``predict``
        on ``predict_dir``; evaluation data is then read against the checkpoint's classes. Loaded after
        (Lightning, after ``setup``), the data's classes must be the checkpoint's."""
        if self.shard_set is not None:
            self.shard_set.check_checkpoint(state_dict)
        rule = adopt(self.split_rule, state_dict.get("split_rule"), SplitRule())
        if rule != self.split_rule:  # the checkpoint's split rule: the items are split again by it
            print(f"[healthcare] the checkpoint's split: {rule.describe()}", file=sys.stderr)
            self.split_rule = rule
            self.__dict__.pop("split_assignment", None)
            self.datasets = {}
        given = self.hparams.class_names
        data_classes = list(self.source.class_names) if "source" in self.__dict__ else (list(given) if given else None)
        if data_classes is not None and state_dict.get("class_names") != data_classes:
            raise ValueError(
                f"the checkpoint was trained on classes {state_dict.get('class_names')} but the data has {data_classes}; "
                "pass --data.class_names to use the checkpoint's class order"
            )
        if self.restored is None and "source" not in self.__dict__ and "image_shape" in state_dict:
            self.restored = dict(state_dict)
        self.channel_mean = state_dict["channel_mean"]
        self.channel_std = state_dict["channel_std"]
        self.reference = state_dict.get(REFERENCE_KEY)  # absent in checkpoints written before it existed
