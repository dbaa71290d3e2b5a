"""``ImageClassifier``: training logic for medical image classification (the network is in ``networks.py``).

Binary tasks use one logit and ``BCEWithLogitsLoss`` (class balance as ``pos_weight``); multi-class
tasks use softmax cross-entropy (class weights); multi-label tasks use one sigmoid per label.
Metrics (torchmetrics): AUROC, accuracy, macro F1 and F1 per class; at test time a confusion
matrix, a ROC curve, a grid of sample predictions (predicted class and calibrated probability) and
their Grad-CAM heat maps are saved in the run folder and logged to W&B; ``predict --explain`` writes a
heat map per image (``domains/healthcare/explain.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics import AUROC, ROC, Accuracy, ConfusionMatrix, F1Score, MetricCollection
from torchmetrics.wrappers import ClasswiseWrapper

from domains.healthcare.intervals import resampled_test_values
from domains.healthcare.explain import GRADCAM_LAYERS, GradCamWriter, explain_batch, explainable_copy, gradcam_layer
from domains.healthcare.networks import InferenceClassifier, NetworkName, build_network, load_pretrained_weights, min_input_size
from pipelines.calibration import ThresholdMethod
from pipelines.classifier_calibration import ClassifierCalibration, decision_centred
from pipelines.errors import InputError
from pipelines.evaluation_means import EvaluationMeans
from pipelines.evaluation_plots import confusion_figure, roc_figure, threshold_text
from pipelines.explain import overlay_grid
from pipelines.export_spec import ExportSpec
from pipelines.plots import image_grid, metric_figure
from pipelines.task import BaseTask
from pipelines.tracking import log_figure


class ImageClassifier(BaseTask):
    """Classify 2-D images or 3-D volumes with a MONAI network.

    Args:
        network: ``resnet10/18/34/50``, ``densenet121`` or ``efficientnet-b0`` (``monai.networks.nets``).
        small_input_stem: ResNet stem for small images (3x3 stride-1 convolution, no max-pool).
        width: ResNet channel multiplier (0.5 halves the channels, a quarter of the parameters).
        dropout: dropout before the classifier (DenseNet121).
        pretrained_weights: a local ``.safetensors`` or weights-only ``.pt`` state dict to start from.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``cosine``, ``step`` (x0.1 at 50 % and 75 % of the epochs) or ``constant``.
        num_classes: number of classes (labels for multi-label); linked from the data.
        in_channels: image channels; linked from the data.
        spatial_dims: 2 or 3; linked from the data.
        task: ``binary``, ``multiclass`` or ``multilabel``; linked from the data.
        class_names: class names in label order; linked from the data and saved in the checkpoint.
        class_weights: loss weights fitted on the training split; linked from the data.
        positive_class: the positive class of a binary task (class index 1); linked from the data,
            saved in the checkpoint and named in the metrics (``val/prevalence_<name>``).
        input_shape: channel-first shape of one input; linked from the data. The network is checked
            against it when the model is built (before any run folder exists): every spatial side
            must be at least :func:`min_input_size` and a forward pass must succeed.
        sample_grid_size: images in the logged grid of sample predictions, and at test in the grid of their
            Grad-CAM heat maps (0 disables both).
        channels_last: on a GPU, keep 2-D images and weights in channels-last memory format (faster
            convolutions with mixed precision); ignored on CPU and for volumes.
        calibrate: fit a temperature on the validation logits after every validation epoch (binary and
            multi-class; ``pipelines/classifier_calibration.py``); predictions, exports and the server
            give the calibrated probability.
        threshold_method: the binary operating point, chosen on validation: ``fixed`` (0.5),
            ``sensitivity`` or ``specificity`` (reach ``threshold_target``), ``cost`` (least
            ``cost_fn`` x missed positives + ``cost_fp`` x false alarms). Saved in the checkpoint and
            applied in predict, export and serving.
        threshold_target: the sensitivity or specificity wanted (``threshold_method`` ``sensitivity``/``specificity``).
        cost_fn: cost of one missed positive (``threshold_method: cost``).
        cost_fp: cost of one false alarm (``threshold_method: cost``).
    """

    def __init__(
        self,
        network: NetworkName = "resnet18",
        small_input_stem: bool = True,
        width: float = 1.0,
        dropout: float = 0.0,
        pretrained_weights: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        lr_schedule: str = "cosine",
        num_classes: int = 2,
        in_channels: int = 1,
        spatial_dims: int = 2,
        task: str = "multiclass",
        class_names: list[str] | None = None,
        class_weights: list[float] | None = None,
        positive_class: str | None = None,
        input_shape: list[int] | None = None,
        sample_grid_size: int = 16,
        channels_last: bool = True,
        calibrate: bool = True,
        threshold_method: ThresholdMethod = "fixed",
        threshold_target: float = 0.9,
        cost_fn: float = 1.0,
        cost_fp: float = 1.0,
    ) -> None:
        if task not in ("binary", "multiclass", "multilabel"):
            raise ValueError(f"task must be binary, multiclass or multilabel, got {task!r}")
        if task == "binary" and num_classes != 2:
            raise ValueError(f"a binary task has 2 classes, got num_classes={num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        super().__init__()
        self._grid_batch: dict[str, torch.Tensor] | None = None

    @property
    def class_labels(self) -> list[str]:
        return list(self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)])

    def configure_models(self) -> None:
        hp = self.hparams
        out_channels = 1 if hp.task == "binary" else hp.num_classes
        self.network = build_network(hp.network, hp.spatial_dims, hp.in_channels, out_channels, hp.small_input_stem, hp.dropout, hp.width)
        if hp.pretrained_weights:
            skipped = load_pretrained_weights(self.network, hp.pretrained_weights)
            print(f"[healthcare] loaded {hp.pretrained_weights}; {len(skipped)} tensor(s) kept at initialisation")
        if hp.input_shape is not None:
            self.check_input_shape(tuple(hp.input_shape))

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse an input shape the network cannot take (InputError naming the sizes and what to change).

        ResNets, DenseNet and EfficientNet end in adaptive pooling, so they run on any size without an
        error (a 1x1 image "trains"); below their total downsampling (8 for a small-stem ResNet, 32 for
        the others) the deepest layers see nothing but padding, which is refused too.
        """
        hp = self.hparams
        need = min_input_size(hp.network, hp.small_input_stem)
        spatial = tuple(int(s) for s in shape[1:])
        stem = f" with small_input_stem={hp.small_input_stem}" if hp.network.startswith("resnet") else ""
        if min(spatial) < need:
            raise InputError(
                f"network {hp.network!r}{stem} cannot take inputs of shape {tuple(shape)} (channels first): it downsamples "
                f"by {need}, so every side needs at least {need} pixels; set --data.image_size {need} or more"
                + ("" if hp.network.startswith("resnet") and hp.small_input_stem else ", or use a ResNet with --model.small_input_stem true (8 pixels)")
            )
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad():
                self.network(torch.zeros(1, *shape))
        except RuntimeError as error:
            raise InputError(
                f"network {hp.network!r} cannot take inputs of shape {tuple(shape)} (channels first): "
                f"{str(error).splitlines()[0]}; use a larger --data.image_size or a ResNet with small_input_stem"
            ) from None
        finally:
            self.network.train(was_training)

    def configure_losses(self) -> None:
        weights = torch.tensor(self.hparams.class_weights, dtype=torch.float32) if self.hparams.class_weights else None
        if self.hparams.task == "multiclass":
            self.loss_fn: nn.Module = nn.CrossEntropyLoss(weight=weights)
        else:
            self.loss_fn = nn.BCEWithLogitsLoss(pos_weight=weights)

    def _metric_args(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.task == "binary":
            return {"task": "binary"}
        if hp.task == "multiclass":
            return {"task": "multiclass", "num_classes": hp.num_classes}
        return {"task": "multilabel", "num_labels": hp.num_classes}

    def configure_metrics(self) -> None:
        args = self._metric_args()
        averaged = {} if args["task"] == "binary" else {"average": "macro"}
        metrics: dict[str, Any] = {
            "auroc": AUROC(**args, **averaged),
            "accuracy": Accuracy(**args),
            "f1": F1Score(**args, **averaged),
        }
        if args["task"] != "binary":
            metrics["f1_per_class"] = ClasswiseWrapper(F1Score(**args, average="none"), labels=self.class_labels, prefix="f1_")
        collection = MetricCollection(metrics, compute_groups=False)  # the class-wise F1 keeps its own state
        self.train_accuracy = Accuracy(**args)
        self.val_metrics = collection.clone(prefix="val/")
        self.test_metrics = collection.clone(prefix="test/")
        self.test_confusion = ConfusionMatrix(**args)
        self.test_roc = ROC(**args)
        prevalence = [f"{stage}/prevalence_{self.class_labels[1]}" for stage in ("val", "test")] if args["task"] == "binary" else []
        self.evaluation_means = EvaluationMeans(["val/loss", "test/loss", *prevalence])  # exact over every process's samples
        hp = self.hparams
        self.calibration = None if hp.task == "multilabel" else ClassifierCalibration(
            hp.task == "binary", hp.calibrate, hp.threshold_method, hp.threshold_target, hp.cost_fn, hp.cost_fp
        )  # fmt: skip

    def _use_channels_last(self, image: torch.Tensor) -> bool:
        return bool(self.hparams.channels_last) and image.is_cuda and image.ndim == 4

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self._use_channels_last(image):
            image = image.contiguous(memory_format=torch.channels_last)
        return self.network(image)

    def on_fit_start(self) -> None:
        if self.hparams.channels_last and self.device.type == "cuda" and self.hparams.spatial_dims == 2:
            self.network.to(memory_format=torch.channels_last)

    def setup(self, stage: str) -> None:
        """Check the network takes the data's image size (when no ``input_shape`` was linked) before training."""
        super().setup(stage)
        shape = getattr(getattr(self.trainer, "datamodule", None), "image_shape", None)
        if shape is not None and self.hparams.input_shape is None:
            self.check_input_shape(tuple(shape))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities: P(positive) ``(N,)`` for binary, ``(N, C)`` otherwise (multi-label: uncalibrated sigmoids)."""
        return self.calibration.probabilities(logits) if self.calibration is not None else torch.sigmoid(logits)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, logits, calibrated probabilities and targets of a batch."""
        logits = self(batch["image"])
        target = batch["label"]
        if self.hparams.task == "multiclass":
            loss = self.loss_fn(logits, target.long())
        elif self.hparams.task == "binary":
            loss = self.loss_fn(logits[:, 0], target.float())
        else:
            loss = self.loss_fn(logits, target.float())
        return loss, logits.detach(), self.probabilities(logits.detach()), target.long()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, probs, target = self._step(batch)
        self.train_accuracy(probs, target)
        batch_size = len(target)
        self.log_train_loss(loss, batch_size)
        self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, metrics: MetricCollection) -> torch.Tensor:
        loss, logits, probs, target = self._step(batch)
        if self.calibration is not None:
            self.calibration.update(stage, logits, target)
        # binary: accuracy and F1 at the operating threshold (torchmetrics decides at 0.5), AUROC unchanged
        metrics.update(decision_centred(probs, self.calibration.threshold) if self.hparams.task == "binary" else probs, target)
        # a class-weighted cross-entropy is a mean over the batch's target weights, the other losses over its samples
        weights = self.loss_fn.weight if self.hparams.task == "multiclass" else None
        self.evaluation_means.log(self, f"{stage}/loss", loss, len(target) if weights is None else weights[target.long()].sum())
        if self.hparams.task == "binary":  # names the positive class in every summary: the share of it among the labels
            self.evaluation_means.log(self, f"{stage}/prevalence_{self.class_labels[1]}", target.float().mean(), len(target))
        if self._grid_batch is None and self.hparams.sample_grid_size:
            keep = self.hparams.sample_grid_size
            self._grid_batch = {"image": batch["image"][:keep].cpu(), "label": target[:keep].cpu(), "probs": probs[:keep].cpu()}
        return probs

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        probs = self._evaluate(batch, "test", self.test_metrics)
        self.test_confusion.update(self._predicted_labels(probs) if self.hparams.task != "multilabel" else probs, batch["label"].long())
        self.test_roc.update(probs, batch["label"].long())

    def _log_collection(self, metrics: MetricCollection) -> None:
        # compute() already gathers every process's state: the values are identical on all ranks
        self.log_dict(metrics.compute(), sync_dist=True)
        metrics.reset()

    def _label_text(self, values: torch.Tensor) -> str:
        names = self.class_labels
        if self.hparams.task == "multilabel":
            return "|".join(names[i] for i in torch.nonzero(values).flatten().tolist()) or "-"
        return names[int(values)]

    def _grid_titles(self, label: torch.Tensor, probs: torch.Tensor) -> list[str]:
        """True class, predicted class and its calibrated probability (binary: P(positive); multi-label: each predicted label's)."""
        predicted, names, titles = self._predicted_labels(probs), self.class_labels, []
        for truth, guess, p in zip(label, predicted, probs):
            if self.hparams.task == "binary":
                said = f"{names[int(guess)]}\nP({names[1]}) {float(p):.2f}"
            elif self.hparams.task == "multiclass":
                said = f"{names[int(guess)]} {float(p[int(guess)]):.2f}"
            else:
                said = ", ".join(f"{names[i]} {float(p[i]):.2f}" for i in torch.nonzero(guess).flatten().tolist()) or "-"
            titles.append(f"true {self._label_text(truth)}\npred {said}")
        return titles

    def _log_sample_grid(self, stage: str) -> None:
        """The grid of sample predictions; at test, also their Grad-CAM heat maps (``test/gradcam``, domains/healthcare/explain.py)."""
        grid, self._grid_batch = self._grid_batch, None
        if grid is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        titles = self._grid_titles(grid["label"], grid["probs"])
        image = grid["image"]
        log_figure(self.trainer, image_grid(image[:, :, image.shape[2] // 2] if image.ndim == 5 else image, titles), f"{stage}/sample_predictions")
        if stage == "test" and self.hparams.network in GRADCAM_LAYERS:
            maps = explain_batch(self, explainable_copy(self), gradcam_layer(self.hparams.network, self.network), image)
            figure = overlay_grid(image, maps, titles)
            figure.suptitle("Grad-CAM, test: where the evidence for the predicted class lies" + (f" (binary: for {self.class_labels[1]})" if self.hparams.task == "binary" else ""), fontsize=8)
            log_figure(self.trainer, figure, "test/gradcam")

    def explanation_writer(self, predictions: Path) -> GradCamWriter:
        """``predict --explain``: Grad-CAM heat maps beside ``predictions`` (refused when the network has no known target layer)."""
        return GradCamWriter(predictions, self)

    def _predicted_labels(self, probs: torch.Tensor) -> torch.Tensor:
        """Binary: P(positive) at or above the operating threshold; multi-class: the most probable class."""
        return self.calibration.decide(probs) if self.calibration is not None else (probs > 0.5).long()

    def on_validation_epoch_end(self) -> None:
        self._log_collection(self.val_metrics)
        self._log_sample_grid("val")
        if self.calibration is not None:
            fitted = {} if self.trainer.sanity_checking else self.calibration.fit()  # a few sanity batches fit nothing
            self.calibration.collect("val")  # (empty after fit) the sanity check's logits are dropped
            self.log_dict({k: float(v) for k, v in fitted.items()}, sync_dist=True)

    def _test_metric_values(self, logits: torch.Tensor, target: torch.Tensor) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        """The logged test metrics of bootstrap resamples of these rows (:func:`resampled_test_values`)."""
        threshold = self.calibration.threshold if self.hparams.task == "binary" else None
        return resampled_test_values(logits, target, self.probabilities(logits), threshold, self.loss_fn, self.class_labels)

    def on_test_epoch_end(self) -> None:
        self._log_collection(self.test_metrics)
        self._log_sample_grid("test")
        task = self.hparams.task
        confusion = self.test_confusion.compute()
        roc = self.test_roc.compute()
        calibration_metrics, figures, self.metric_intervals = self.calibration.evaluate_test(self._test_metric_values) if self.calibration else ({}, {}, {})
        self.log_dict({k: float(v) for k, v in calibration_metrics.items()}, sync_dist=True)
        if self.trainer.is_global_zero:
            if task == "multilabel":
                fig = metric_figure(self.test_confusion, confusion, panels=self.class_labels)
                log_figure(self.trainer, fig, "test/confusion_matrix")
                fig = metric_figure(self.test_roc, roc, score=True, labels=self.class_labels)
            else:
                # binary: drawn at the operating threshold (_predicted_labels), shown with the digits that tell it from 0.5
                title = f"Confusion matrix, test (operating threshold {threshold_text(self.calibration.threshold)})" if task == "binary" else "Confusion matrix, test"
                log_figure(self.trainer, confusion_figure(confusion, self.class_labels, title), "test/confusion_matrix")
                curves = {self.class_labels[1]: roc[:2]} if task == "binary" else {n: (f, t) for n, f, t in zip(self.class_labels, roc[0], roc[1])}
                fig = roc_figure(curves, {n: float(torch.trapezoid(t, f)) for n, (f, t) in curves.items()},
                                 "ROC curve, test" + (f" (positive class {self.class_labels[1]})" if task == "binary" else " (one class against the rest)"))  # fmt: skip
            log_figure(self.trainer, fig, "test/roc_curve")
            for key, figure in figures.items():
                log_figure(self.trainer, figure, key)
        self.test_confusion.reset()
        self.test_roc.reset()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        probs = self.probabilities(self(batch["image"]))
        datamodule = self.trainer.datamodule
        columns: dict[str, Any] = {"item": [datamodule.item_name(int(i)) for i in batch["index"]]}
        names = self.class_labels
        if self.hparams.task == "binary":
            columns[f"prob_{names[1]}"] = probs
        else:
            columns.update({f"prob_{name}": probs[:, i] for i, name in enumerate(names)})
        columns["prediction"] = [self._label_text(p) for p in self._predicted_labels(probs)]
        if (batch["label"] >= 0).all():
            columns["label"] = [self._label_text(t) for t in batch["label"]]
        return columns

    def export_spec(self, datamodule_state: dict[str, Any] | None) -> ExportSpec:
        """Images scaled to [0, 1], channels first -> probabilities per class (normalisation inside)."""
        if not datamodule_state or datamodule_state.get("channel_mean") is None:
            raise ValueError("the checkpoint holds no MedicalImageDataModule state (normalisation statistics); export a checkpoint written by `pipelines.run healthcare`")
        hp = self.hparams
        shape = list(datamodule_state["image_shape"])
        temperature = self.calibration.temperature if self.calibration is not None else 1.0
        module = InferenceClassifier(
            copy.deepcopy(self.network), datamodule_state["channel_mean"], datamodule_state["channel_std"], hp.task, hp.spatial_dims, temperature
        ).eval()
        return ExportSpec(
            module=module,
            example_inputs=(torch.rand(2, *shape),),
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
            input_ranges={"image": (0.0, 1.0, "intensities by bit depth: 8-bit pixels / 255, 16-bit / 65535")},
            metadata={
                "task": hp.task,
                "class_names": self.class_labels,
                "image_shape": shape,
                "input": "float32 images, channels first, intensities in [0, 1] by bit depth (value / (2**bits - 1): 8-bit / 255, 16-bit / 65535; pipelines/images.py)",
                "positive_class": self.class_labels[1] if hp.task == "binary" else None,
                "output": "probabilities, one column per class (independent per label for multilabel)",
                "decision_threshold": (self.calibration.threshold if hp.task == "binary" else 0.5) if hp.task != "multiclass" else None,
                "calibration": {
                    "temperature": temperature,
                    "method": "temperature scaling fitted on the validation split (inside the exported graph)" if hp.task != "multilabel" else "none",
                    "threshold_method": hp.threshold_method,
                    "decision": "positive when probabilities[:, 1] >= decision_threshold" if hp.task == "binary" else None,
                },
            },
        )
