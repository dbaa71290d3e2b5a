"""Reference statistics of the training data: what drift is measured against once the training files are gone.

A data module fits them on its **training split** (the rows the model learned from) and returns
them under ``"reference_statistics"`` in its ``state_dict``, so Lightning saves them in every
checkpoint; the exporter copies them into the bundle's ``metadata.json``
(``reference_statistics``); ``python -m pipelines.monitor`` reads them from either. Per numeric
feature: count, missing count, mean, standard deviation, min, max and ``QUANTILE_POINTS`` evenly
spaced quantiles (0 %, 0.5 %, ..., 100 %), a few KB per feature whatever the data's size. Sequence
models (autonomous) fit them per channel of their sequence inputs (:func:`fit_sequence_reference`),
generators (media) on a per-image summary of their training images, named as the request log names
the generated images, with a sample of whole summary rows for an MMD test (:func:`fit_output_image_reference`).

:func:`reference_frame` turns them back into a pseudo-sample (the quantile function at evenly spaced
probabilities), on which :func:`pipelines.drift.compare` computes PSI on the reference's deciles
(exact, up to the 0.5 % resolution) and the two-sample KS test. Example::

    >>> import numpy as np, pandas as pd
    >>> stats = fit_reference(pd.DataFrame({"amount": np.arange(1000.0)}), source="example")
    >>> stats["features"]["amount"]["quantiles"][100], len(reference_frame(stats))
    (499.5, 1000)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FORMAT = 1
KEY = "reference_statistics"
QUANTILE_POINTS = 201
PSEUDO_SAMPLE = 1000


def fit_reference(frame: pd.DataFrame, columns: list[str] | None = None, source: str = "training split", input_name: str | None = None) -> dict[str, Any]:
    """Per-feature statistics of ``frame`` (default: every numeric, non-boolean column); non-finite values count as missing.

    ``input_name``: the bundle input whose columns these are, in order (the server's request log names
    that input's columns after them).
    """
    from pipelines.drift import numeric_columns

    columns = numeric_columns(frame) if columns is None else columns
    probabilities = np.linspace(0.0, 1.0, QUANTILE_POINTS)
    features = {}
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        if len(finite) == 0:
            continue
        features[str(column)] = {
            "count": int(len(finite)), "missing": int(len(values) - len(finite)),
            "mean": float(finite.mean()), "std": float(finite.std()), "min": float(finite.min()), "max": float(finite.max()),
            "quantiles": [float(q) for q in np.quantile(finite, probabilities)],
        }  # fmt: skip
    return {"format": FORMAT, "source": source, "rows": int(len(frame)), "input": input_name, "columns": [str(c) for c in columns], "features": features}


def image_intensities(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and std over each image's pixels of ``images`` (``(N, C, ...)``; uint8/uint16 scaled to [0, 1] by bit depth)."""
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(images.dtype, 1.0)
    flat = images.reshape(len(images), -1).astype(np.float64) / scale
    return flat.mean(axis=1), flat.std(axis=1)


def image_reference(means: np.ndarray, stds: np.ndarray, input_name: str, source: str) -> dict[str, Any]:
    """The reference of per-image intensities (:func:`image_intensities`, gathered over any number of blocks)."""
    return fit_reference(pd.DataFrame({f"{input_name}.mean": means, f"{input_name}.std": stds}), source=source)


def fit_image_reference(images: np.ndarray, input_name: str, source: str, chunk: int = 256) -> dict[str, Any]:
    """Per-image intensity summary of ``images`` (``(N, C, ...)``; uint8/uint16 scaled to [0, 1] by bit depth): the
    ``<input>.mean`` and ``<input>.std`` over each image's pixels, the columns the request log writes for an image input."""
    parts = [image_intensities(images[start : start + chunk]) for start in range(0, len(images), chunk)]
    return image_reference(np.concatenate([m for m, _ in parts]), np.concatenate([s for _, s in parts]), input_name, source)


POOL = 4  # image embedding: the mean intensity of each cell of a POOL x POOL grid
SAMPLE_ROWS = 300  # rows of a multivariate reference kept whole, for the MMD test (pipelines.monitor_mmd)


def image_summary(images: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """Per-image summary of ``(N, C, H, W)`` images in [0, 1]: ``<name>.mean``, ``<name>.std`` and the ``POOL x POOL``
    grid of mean intensities (channels averaged) ``<name>.pool[k]``: the request log's columns of an image output."""
    images = np.asarray(images, dtype=np.float64)
    flat = images.reshape(len(images), -1)
    grey = images.mean(axis=1)  # (N, H, W)
    rows, cols = np.array_split(np.arange(grey.shape[1]), POOL), np.array_split(np.arange(grey.shape[2]), POOL)
    cells = [grey[:, r[0] : r[-1] + 1, c[0] : c[-1] + 1].mean(axis=(1, 2)) for r in rows for c in cols]
    return {f"{name}.mean": flat.mean(axis=1), f"{name}.std": flat.std(axis=1), **{f"{name}.pool[{k}]": cell for k, cell in enumerate(cells)}}


def fit_output_image_reference(pixels: np.ndarray, output_name: str, source: str, chunk: int = 512, seed: int = 0) -> dict[str, Any]:
    """The reference of a generator: the summary (:func:`image_summary`) of its training images ``pixels`` (uint8
    ``(N, H, W, C)``), named as the request log names its output ``output_name`` (``output.<name>.mean``, ...),
    with ``SAMPLE_ROWS`` of the summary rows kept whole for a multivariate (MMD) test of the generated images."""
    parts = []
    for start in range(0, len(pixels), chunk):
        block = np.moveaxis(np.asarray(pixels[start : start + chunk]), -1, 1).astype(np.float64) / 255.0
        parts.append(pd.DataFrame(image_summary(block, f"output.{output_name}")))
    frame = pd.concat(parts, ignore_index=True)
    stats = fit_reference(frame, source=source)
    rows = np.random.default_rng(seed).choice(len(frame), size=min(SAMPLE_ROWS, len(frame)), replace=False)
    stats["output"] = output_name
    stats["sample"] = {"columns": list(frame.columns), "rows": frame.to_numpy()[np.sort(rows)].round(6).tolist()}
    return stats


def fit_sequence_reference(inputs: dict[str, Any], channel_names: dict[str, list[str]], source: str) -> dict[str, Any]:
    """Per sequence channel: the mean over each window's time steps of every channel of the model's sequence inputs
    named in ``channel_names`` (arrays or tensors ``(N, T, C)`` among ``inputs``; e.g. ``past`` positions centred on the last
    observed one, and ``channels``), named ``<input>.<channel>``: the request log's columns for those inputs
    (``sequence_inputs`` names the channels)."""
    arrays = {name: np.asarray(inputs[name], dtype=np.float64) for name in channel_names}
    columns = {f"{name}.{channel}": arrays[name][:, :, j].mean(axis=1) for name in arrays for j, channel in enumerate(channel_names[name])}
    stats = fit_reference(pd.DataFrame(columns), source=f"{source} ({len(next(iter(arrays.values())))} windows)")
    stats["sequence_inputs"] = {name: list(names) for name, names in channel_names.items() if names}
    return stats


def reference_frame(stats: dict[str, Any], size: int = PSEUDO_SAMPLE) -> pd.DataFrame:
    """A pseudo-sample per feature: the reference's quantile function at probabilities ``(i + 0.5) / n``, ``n`` the
    feature's real count up to ``size`` (a KS test must not believe the reference larger than it was), NaN-padded to ``size``."""
    check(stats, "reference statistics")
    probabilities = np.linspace(0.0, 1.0, QUANTILE_POINTS)
    columns = {}
    for name, feature in stats["features"].items():
        n = max(2, min(size, int(feature["count"])))
        values = np.interp((np.arange(n) + 0.5) / n, probabilities, np.asarray(feature["quantiles"], dtype=float))
        columns[name] = np.concatenate([values, np.full(size - n, np.nan)]) if n < size else values
    return pd.DataFrame(columns)


def units_note(stats: dict[str, Any] | None) -> str | None:
    """What units a window must be in to be compared with ``stats`` (a refused window's message, :mod:`pipelines.drift_units`)."""
    if not stats or not stats.get("input"):
        return None
    return (f"These reference statistics are of the model's input {stats['input']!r}, its columns after the model's fitted preprocessing "
            "(what the server's request log records): give the server's request log (pipelines.serve --request_log), not raw data "
            "such as amounts in currency units.")  # fmt: skip


def check(stats: Any, where: str) -> dict[str, Any]:
    """``stats`` if it is a reference this code reads; ``ValueError`` naming ``where`` otherwise."""
    if not isinstance(stats, dict) or stats.get("format") != FORMAT or not isinstance(stats.get("features"), dict) or not stats["features"]:
        raise ValueError(f"{where}: not reference statistics of format {FORMAT} with at least one feature")
    for name, feature in stats["features"].items():
        if len(feature.get("quantiles", [])) != QUANTILE_POINTS:
            raise ValueError(f"{where}: feature {name!r} has {len(feature.get('quantiles', []))} quantiles; expected {QUANTILE_POINTS}")
    return stats


def load_reference(path: str | Path) -> dict[str, Any]:
    """Reference statistics from a bundle folder (``metadata.json``), a registry version folder (its
    ``checkpoint_extras.pt``) or a Lightning checkpoint (``.ckpt``); checkpoints are read weights-only.

    ``ValueError`` naming the file when it has none (a model trained before they existed, or a domain that does not fit them).
    """
    import json

    from pipelines.registry_loading import EXTRAS_FILE, MANIFEST_FILE

    path = Path(path)
    if path.is_dir() and (path / EXTRAS_FILE).is_file() and (path / MANIFEST_FILE).is_file():  # a registry version (versions/vNNNN)
        import torch

        found = find_in_checkpoint(torch.load(path / EXTRAS_FILE, map_location="cpu", weights_only=True))
    elif path.is_dir():
        metadata_file = path / "metadata.json"
        if not metadata_file.is_file():
            raise ValueError(f"{path}: not a bundle (no metadata.json)")
        found = json.loads(metadata_file.read_text()).get(KEY)
    elif path.suffix == ".ckpt" and path.is_file():
        import torch

        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - not a weights-only checkpoint
            raise ValueError(f"{path}: not a weights-only checkpoint ({error})") from None
        found = find_in_checkpoint(checkpoint)
    else:
        raise ValueError(f"{path}: expected a bundle folder or a .ckpt checkpoint")
    if found is None:
        raise ValueError(f"{path}: holds no {KEY} (exported or trained before they were saved, or its domain does not fit them); "
                         "give a bundle folder, a .ckpt or a registry version folder that holds them, or a table of data in the "
                         "window's own units")  # fmt: skip
    return check(found, str(path))


def find_in_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The reference statistics of a checkpoint's data module state (whatever the data module's class name)."""
    for value in checkpoint.values():
        if isinstance(value, dict) and KEY in value:
            return value[KEY]
    return None
