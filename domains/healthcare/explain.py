"""Grad-CAM for the healthcare classifiers, with MONAI's own implementation (``monai.visualize.GradCAM``).

A heat map shows where in the image the evidence for a class lies: the target layer's activations
weighted by the gradient of that class's logit, summed over channels, kept where positive,
upsampled to the image and scaled so each image's strongest point is 1 (0 everywhere when nothing
speaks for the class). The class explained is the one the image is predicted as; a binary model
has one logit, so its maps always show the evidence for the positive class. A multi-label model's
image gets one map per label predicted positive (probability above 0.5, the model's decision), or
per label asked for (``labels``), each named by its class; an image with no positive label is
explained for its most probable label (the test grid shows that one map per image).

The target layer is the last convolutional stage, whose output the classifier pools, per MONAI network:

========================  ======================  ===============================================
network                   target layer            why
========================  ======================  ===============================================
resnet10/18/34/50         ``layer4``              the last residual stage
densenet121               ``class_layers.relu``   the final norm + ReLU before pooling (MONAI's own example)
efficientnet-b0           ``_conv_head``          the head convolution (``_swish`` serves both stem and
                                                  head, so hooks on it would mix the two)
========================  ======================  ===============================================

A network without an entry (or whose entry names no module of the network built) is refused with
:class:`~pipelines.errors.InputError` rather than explained at a guessed layer.

Maps are computed on a fresh copy of the task's network (same weights, built by ``build_network``):
MONAI registers hooks it never removes, so the trained network and its exports stay untouched, and
the copy's parameters need no gradient (only the activations do). Lightning runs ``test`` and
``predict`` without autograd (inference mode); Grad-CAM turns it back on for its own forward and backward.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from domains.healthcare.networks import build_network
from pipelines.errors import InputError
from pipelines.explain import ExplanationFolder, display_plane, heatmap_plane, item_file_stem, overlay_rgb, scaled

GRADCAM_LAYERS = {
    "resnet10": "layer4", "resnet18": "layer4", "resnet34": "layer4", "resnet50": "layer4",
    "densenet121": "class_layers.relu", "efficientnet-b0": "_conv_head",
}  # fmt: skip
#: per-item heat-map images are enlarged (nearest neighbour) to at least this height, so small images stay readable
MIN_FILE_SIDE = 128


def gradcam_layer(network_name: str, network: torch.nn.Module) -> str:
    """The Grad-CAM target layer of a MONAI network (the table of the module), checked to exist in ``network``.

    Example:
        >>> gradcam_layer("resnet18", build_network("resnet18", 2, 1, 3))
        'layer4'
    """
    layer = GRADCAM_LAYERS.get(network_name)
    if layer is None:
        raise InputError(
            f"--explain: no Grad-CAM target layer is known for network {network_name!r} (known: {sorted(GRADCAM_LAYERS)}); "
            "run predict without --explain"
        )
    if layer not in dict(network.named_modules()):
        raise InputError(f"--explain: network {network_name!r} has no module {layer!r} (Grad-CAM's target layer for it; a MONAI version with other names?)")
    return layer


def explainable_copy(task: Any) -> torch.nn.Module:
    """A fresh network with the task's weights, on its device, in eval mode, parameters without gradients."""
    hp = task.hparams
    out_channels = 1 if hp.task == "binary" else hp.num_classes
    with torch.inference_mode(False):  # built outside Lightning's inference mode, or autograd could not use its weights
        network = build_network(hp.network, hp.spatial_dims, hp.in_channels, out_channels, hp.small_input_stem, hp.dropout, hp.width)
        network.load_state_dict(task.network.state_dict())
    return network.to(task.device).eval().requires_grad_(False)


def explained_classes(task: str, probs: torch.Tensor) -> torch.Tensor:
    """The logit each image's map explains: the predicted class (multi-class), the most probable label
    (multi-label), the one logit (binary: the positive class)."""
    if task == "binary":
        return torch.zeros(len(probs), dtype=torch.long, device=probs.device)
    return probs.argmax(1)


def explained_labels(probs: torch.Tensor, labels: list[int] | None = None) -> list[list[int]]:
    """A multi-label model's labels to explain per image: ``labels`` when given, else every label predicted
    positive (probability above 0.5), else (none positive) the most probable one.

    Example:
        >>> explained_labels(torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.3, 0.2]]))
        [[0, 2], [1]]
    """
    if labels is not None:
        return [list(labels) for _ in range(len(probs))]
    return [torch.nonzero(p > 0.5).flatten().tolist() or [int(p.argmax())] for p in probs]


def label_maps(task: Any, network: torch.nn.Module, layer: str, images: torch.Tensor, labels: list[str] | None = None) -> list[dict[str, torch.Tensor]]:
    """Per image, ``{class name: Grad-CAM map}``: a multi-label model's every positive label (or each of
    ``labels``, class names; see :func:`explained_labels`), other models' one explained class."""
    names = list(task.class_labels)
    unknown = sorted(set(labels or []) - set(names))
    if unknown or (labels and task.hparams.task != "multilabel"):
        raise InputError(f"labels to explain {labels}: only a multi-label model's maps can be asked for by label, among its classes {names}")
    with torch.no_grad():
        probs = task.probabilities(network(images.to(task.device)))
    if task.hparams.task != "multilabel":
        classes = explained_classes(task.hparams.task, probs)
        maps = gradcam_maps(network, layer, images, classes)
        return [{names[1] if task.hparams.task == "binary" else names[int(c)]: heatmap} for c, heatmap in zip(classes, maps)]
    chosen = explained_labels(probs, None if labels is None else [names.index(label) for label in labels])
    rows = torch.tensor([i for i, image_labels in enumerate(chosen) for _ in image_labels], dtype=torch.long)
    classes = torch.tensor([c for image_labels in chosen for c in image_labels], dtype=torch.long)
    maps = gradcam_maps(network, layer, images[rows.to(images.device)], classes)  # one map per (image, label) pair
    per_image: list[dict[str, torch.Tensor]] = [{} for _ in chosen]
    for row, label, heatmap in zip(rows.tolist(), classes.tolist(), maps):
        per_image[row][names[label]] = heatmap
    return per_image


def gradcam_maps(network: torch.nn.Module, layer: str, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps ``(N, *spatial)`` in [0, 1] of ``images`` (normalised, channels first) for ``classes``.

    MONAI's ``GradCAM`` takes one class index per call (``logits[:, class_idx]``; a tensor of per-image
    indices would index every image's logits with every index), so images are explained one class at a time."""
    from monai.visualize import GradCAM

    device = next(network.parameters()).device
    with torch.inference_mode(False), torch.enable_grad():
        inputs = images.detach().to(device).float().clone()  # a normal tensor: one made in inference mode cannot enter autograd
        cam = GradCAM(nn_module=network, target_layers=layer, postprocessing=lambda maps: maps)  # raw maps; scaled below
        maps = torch.zeros(len(inputs), *inputs.shape[2:], device=device)
        for value in classes.unique().tolist():
            rows = (classes == value).to(device)
            raw = cam(inputs[rows].requires_grad_(True), class_idx=int(value))[:, 0].detach()
            peak = raw.flatten(1).amax(1).clamp_min(torch.finfo(raw.dtype).tiny).view(-1, *[1] * (raw.ndim - 1))
            maps[rows] = (raw / peak).clamp(0, 1)
    return maps.cpu()


def explain_batch(task: Any, network: torch.nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """Heat maps of a batch for the classes the task predicts (see :func:`explained_classes`)."""
    with torch.no_grad():
        probs = task.probabilities(network(images.to(task.device)))
    return gradcam_maps(network, layer, images, explained_classes(task.hparams.task, probs))


def side_by_side(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The image (grey scaled to its range) beside the image with its heat map, uint8 RGB, enlarged to
    at least :data:`MIN_FILE_SIDE` pixels high."""
    plain = np.rint(255 * scaled(image)).astype(np.uint8)
    plain = np.repeat(plain[..., None], 3, axis=-1) if plain.ndim == 2 else plain[..., :3]
    both = np.concatenate([plain, np.full((plain.shape[0], 2, 3), 255, np.uint8), overlay_rgb(image, heatmap)], axis=1)
    factor = max(1, -(-MIN_FILE_SIDE // both.shape[0]))
    return both.repeat(factor, axis=0).repeat(factor, axis=1)


class GradCamWriter(pl.Callback):
    """``predict --explain``: a Grad-CAM heat map per image beside the predictions file.

    For ``predictions.csv``, the folder ``predictions.heatmaps/`` holds, per row, ``<row>_<item>.png``
    (the image beside the image with its map over it; a volume's middle slice) and ``<row>_<item>.npy``
    (the map itself, float16, the input's spatial shape: every slice of a volume), and the predictions
    file gets a ``heatmap`` column naming the PNG. A multi-label model gets one map per explained label
    (:func:`label_maps`: each positive label), ``<row>_<item>_<class>.png``/``.npy``, and a column
    ``heatmap_<class>`` per class (empty where that label was not explained). Complete or absent
    (:class:`pipelines.explain.ExplanationFolder`). This callback runs before the predictions writer,
    so the columns it adds to each batch's rows are written.
    """

    def __init__(self, predictions: Path, task: Any) -> None:
        self.layer = gradcam_layer(task.hparams.network, task.network)  # refused here, before predict starts
        self.folder = ExplanationFolder(predictions, "heatmaps")
        self.network: torch.nn.Module | None = None
        self.row = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.start(trainer.global_rank, trainer.world_size)
        self.network, self.row = explainable_copy(pl_module), 0  # the weights predict runs with (loaded by now)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        assert self.network is not None
        multilabel = pl_module.hparams.task == "multilabel"
        columns: dict[str, list[str]] = {f"heatmap_{name}": [] for name in pl_module.class_labels} if multilabel else {"heatmap": []}
        for image, maps, item in zip(batch["image"], label_maps(pl_module, self.network, self.layer, batch["image"]), outputs["item"]):
            plane, written = display_plane(image), {}
            for name, heatmap in maps.items():
                stem = item_file_stem(self.row, f"{item} {name}" if multilabel else item)
                self.folder.write_png(f"{stem}.png", side_by_side(plane, heatmap_plane(heatmap)))
                self.folder.write_array(f"{stem}.npy", heatmap.numpy().astype(np.float16))
                written[f"heatmap_{name}" if multilabel else "heatmap"] = self.folder.relative(f"{stem}.png")
            for column, paths in columns.items():
                paths.append(written.get(column, ""))
            self.row += 1
        outputs.update(columns)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.folder.finish()
        self.network = None
        if path is not None:
            print(f"[healthcare] Grad-CAM heat maps of {self.row} image(s) written to {path}", file=sys.stderr)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.folder.discard()
        self.network = None
