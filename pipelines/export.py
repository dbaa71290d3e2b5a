"""``python -m pipelines.run DOMAIN export --ckpt_path CKPT --format onnx|torchscript [--output DIR] [--config FILE.yaml]``.

Writes a self-contained bundle folder::

    model.onnx | model.pt   the domain's ExportSpec module: pre-processing + network + post-processing
    metadata.json           domain, bundle format, inputs/outputs, the domain's pre/post-processing
                            facts (class names, thresholds, scalers...), test metrics, data
                            fingerprint, git commit, package versions, parity with the checkpoint
    runtime.py              a loader that needs only numpy + onnxruntime (or torch for TorchScript)

The checkpoint is read by :mod:`pipelines.checkpoints` (weights only; its model class must be the
domain's model class or a subclass of it: a checkpoint cannot make the exporter import arbitrary code).
Every export is checked: the exported model and the checkpoint's module must agree on the example
inputs within ``--atol``, or no bundle is written.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipelines.bundle_runtime import BUNDLE_FORMAT, Bundle
from pipelines.checkpoints import build_model, check_domain, datamodule_state, read_checkpoint
from pipelines.reference import KEY as REFERENCE_KEY
from pipelines.monitor_budget import KEY as BUDGET_KEY
from pipelines.domain_registry import DomainSpec
from pipelines.errors import InputError
from pipelines.files import sha256_file
from pipelines.parse_errors import explain
from pipelines.quantiles import central_intervals, median_index, quantile_label
from pipelines.stops import sigterm_as_exit
from pipelines.run_folder import git_commit, package_versions, resolve_run
from pipelines.validation import check_model_label

FORMATS = ("onnx", "torchscript")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}


def quantile_output(levels: list[float], output: str = "quantiles", axis: int = 1) -> dict[str, Any]:
    """How a bundle's quantile output reads, for ``domain_metadata.quantile_output``: ``output`` holds the
    levels along ``axis`` (sorted, no crossing), each named by its level (``q10``); ``median`` names the
    point prediction and ``intervals`` the central intervals (``80%``: from ``q10`` to ``q90``) that
    :meth:`pipelines.bundle_runtime.Bundle.intervals` and the server return.

    Example:
        >>> quantile_output([0.1, 0.5, 0.9])["intervals"]
        [{'name': '80%', 'level': 0.8, 'lower': 'q10', 'upper': 'q90'}]
    """
    names = [quantile_label(level) for level in levels]
    return {
        "output": output, "axis": axis, "levels": list(levels), "names": names, "median": names[median_index(levels)],
        "intervals": [{"name": f"{round(100 * level, 6):g}%", "level": level, "lower": names[low], "upper": names[high]}
                      for low, high, level in central_intervals(levels)],
    }  # fmt: skip


def load_task(spec: DomainSpec, ckpt_path: str | Path) -> tuple[torch.nn.Module, dict[str, Any] | None, dict[str, Any]]:
    """Rebuild a domain's LightningModule from a checkpoint (:mod:`pipelines.checkpoints`: weights
    only, the domain's own class). Returns the module (eval mode), the data module state saved in
    the checkpoint, and the checkpoint."""
    ckpt = read_checkpoint(ckpt_path)
    check_domain(spec, ckpt, str(ckpt_path), fix=f"; export it with `python -m pipelines.run {{domain}} export --ckpt_path {ckpt_path}`")
    task = build_model(spec, ckpt, str(ckpt_path))
    return task, datamodule_state(spec, ckpt), ckpt


def _tensor_spec(name: str, tensor: torch.Tensor, dynamic: dict[int, str], value_range: tuple[float, float, str] | None = None) -> dict[str, Any]:
    shape = [dynamic.get(axis, size) for axis, size in enumerate(tensor.shape)]
    spec = {"name": name, "shape": shape, "dtype": str(tensor.dtype).removeprefix("torch.")}
    if value_range is not None:  # Bundle.validate refuses values outside it
        spec |= {"range": [float(value_range[0]), float(value_range[1])], "range_means": value_range[2]}
    return spec


def _as_tuple(value: Any) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _write_model(export, fmt: str, path: Path) -> None:
    module, inputs = export.module.eval(), export.example_inputs
    if fmt == "onnx":
        torch.onnx.export(
            module, inputs, str(path), input_names=export.input_names, output_names=export.output_names,
            dynamic_axes=export.dynamic_axes, dynamo=False, opset_version=17,
        )  # fmt: skip
    else:
        with torch.no_grad():
            traced = torch.jit.trace(module, inputs, check_trace=False)
        traced.save(str(path))


def _parity_inputs(export) -> tuple[torch.Tensor, ...]:
    """The example inputs with a different batch size, so the dynamic batch axis is exercised too."""
    return tuple(torch.cat([x, x[:1]]) for x in export.example_inputs)


def runtime_versions(fmt: str) -> dict[str, str]:
    """The versions a bundle of this format was exported and checked with: Python and the packages ``runtime.py`` imports."""
    names = ("numpy", "onnx", "onnxruntime") if fmt == "onnx" else ("numpy", "torch")
    return {"python": platform.python_version(), **{name: importlib.metadata.version(name) for name in names}}


def make_readable(folder: Path) -> None:
    """Folders 0755 and files 0644 (``tempfile.mkdtemp`` makes a 0700 folder: a server running as another user could not read it)."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def export_checkpoint(
    spec: DomainSpec, ckpt_path: str | Path, fmt: str, output: str | Path, atol: float = 1e-4, extra_metadata: dict | None = None,
    model_name: str | None = None, model_version: str | None = None, replace: bool = False,
) -> Path:
    """Export a checkpoint to a bundle folder (written atomically: a complete bundle or nothing).

    ``model_name``/``model_version`` are recorded in ``metadata.json`` and shown by the server
    (``/info``, ``X-Model-Version``, metrics); without them the server shows the domain and the
    checkpoint's sha256. An ``output`` that exists and is not empty is refused before anything is
    written (it replaced the folder and everything in it: trial finding), unless ``replace`` (the
    server's own cache of registry bundles, whose stale bundle is re-exported).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    output = Path(output)
    if not replace and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(
            f"--output {output}: already exists{' and is not empty' if output.is_dir() else ' (a file)'}; a bundle is written to a new or "
            "empty folder and never over an earlier one (or over other files): choose another folder, or remove this one first"
        )
    ckpt_path = Path(ckpt_path)
    task, datamodule_state, checkpoint = load_task(spec, ckpt_path)
    export = task.export_spec(datamodule_state)
    if fmt in export.unsupported_formats:
        raise InputError(f"--format {fmt}: {export.unsupported_formats[fmt]}")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        with torch.no_grad():
            expected = [o.detach().numpy() for o in _as_tuple(export.module(*_parity_inputs(export)))]
        _write_model(export, fmt, staging / MODEL_FILES[fmt])
        summary_file = ckpt_path.parent.parent / "summary.json"
        metadata = {
            "bundle_format": BUNDLE_FORMAT,
            "domain": spec.name,
            "format": fmt,
            "model_file": MODEL_FILES[fmt],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source_checkpoint": {"name": ckpt_path.name, "sha256": sha256_file(ckpt_path)},
            "inputs": [_tensor_spec(n, t, export.dynamic_axes.get(n, {}), export.input_ranges.get(n)) for n, t in zip(export.input_names, export.example_inputs)],
            "outputs": [{"name": n, "dynamic_axes": export.dynamic_axes.get(n, {})} for n in export.output_names],
            "domain_metadata": export.metadata,
            "metrics": json.loads(summary_file.read_text()).get("test", {}) if summary_file.is_file() else {},
            "git_commit": git_commit(),
            "packages": package_versions(),
            "runtime": runtime_versions(fmt),
            **({REFERENCE_KEY: datamodule_state[REFERENCE_KEY]} if isinstance(datamodule_state, dict) and REFERENCE_KEY in datamodule_state else {}),
            **({BUDGET_KEY: checkpoint[BUDGET_KEY]} if BUDGET_KEY in checkpoint else {}),  # what an alert budget was fitted on (pipelines.monitor_budget)
            **({"model_name": model_name} if model_name else {}),
            **({"model_version": model_version} if model_version else {}),
            **(extra_metadata or {}),
        }
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        shutil.copyfile(Path(__file__).with_name("bundle_runtime.py"), staging / "runtime.py")
        got = Bundle(staging).run(**{n: t.numpy() for n, t in zip(export.input_names, _parity_inputs(export))})
        worst = max(float(np.max(np.abs(got[n] - e))) if e.size else 0.0 for n, e in zip(export.output_names, expected))
        if worst > atol:
            raise RuntimeError(f"exported {fmt} model differs from the checkpoint by {worst:.3g} > atol {atol}; bundle not written")
        metadata["parity"] = {"max_abs_diff": worst, "atol": atol, "batch": int(export.example_inputs[0].shape[0]) + 1}
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        make_readable(staging)
        if replace and output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)  # (over an empty folder too)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def build_parser(spec: DomainSpec) -> Any:
    """The export command's parser: like the runner's, options also come from ``--config FILE.yaml``
    (keys ``ckpt_path``, ``format``, ...) and from ``PIPELINES_EXPORT__<OPTION>`` variables."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog=f"python -m pipelines.run {spec.name} export", description=__doc__.splitlines()[0], exit_on_error=False, default_env=True, env_prefix="PIPELINES_EXPORT_",
    )  # fmt: skip
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint file, or best/last (with --run_id, else the newest run)")
    parser.add_argument("--run_id", type=str | None, default=None, help="the run folder of --ckpt_path best/last")
    parser.add_argument("--runs_dir", type=str, default="runs", help="root folder of run folders")
    parser.add_argument("--format", type=Literal["onnx", "torchscript"], default="onnx", help="the bundle's model format")
    parser.add_argument("--output", type=str | None, default=None, help="bundle folder (default: <run folder>/export/<format>)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed difference from the checkpoint")
    parser.add_argument("--model_name", type=str | None, default=None, help="the model's name, shown by the server (default: the domain)")
    parser.add_argument("--model_version", type=str | None, default=None, help="the model's version, shown by the server (default: sha256-<checkpoint sha256 prefix>)")
    return parser


def free_export_folder(parent: Path, fmt: str) -> Path:
    """The run's default bundle folder: ``export/onnx``, or ``export/onnx-2``, ... when earlier bundles are there (never
    replaced: a server may be running from one), as ``predict`` numbers ``predictions-2.csv``.

    Example:
        >>> import tempfile
        >>> parent = Path(tempfile.mkdtemp())
        >>> free_export_folder(parent, "onnx").name
        'onnx'
        >>> (parent / "onnx").mkdir(); (parent / "onnx" / "model.onnx").write_text("x") and None
        >>> free_export_folder(parent, "onnx").name
        'onnx-2'
    """
    candidate, number = parent / fmt, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        number += 1
        candidate = parent / f"{fmt}-{number}"
    return candidate


def main(spec: DomainSpec, argv: list[str]) -> Path:
    """``python -m pipelines.run DOMAIN export ...``: bad options are refused (:class:`InputError`, exit 2) before anything is written."""
    parser = build_parser(spec)
    try:
        args = parser.parse_args(argv)
        check_model_label(args.model_name, "--model_name")
        check_model_label(args.model_version, "--model_version")
        run = resolve_run(spec.name, args.runs_dir, args.run_id, args.ckpt_path)
    except argparse.ArgumentError as error:
        raise InputError(f"{spec.name} export: {explain(str(error), [o for a in parser._actions for o in a.option_strings], spec.name, 'export')}") from None
    except ValueError as error:
        raise InputError(f"{spec.name} export: {error}") from None
    if run.ckpt_path is None:
        raise InputError(f"{spec.name} export: --ckpt_path {args.ckpt_path}: no checkpoint found")
    output = Path(args.output) if args.output else free_export_folder(Path(run.ckpt_path).parent.parent / "export", args.format)
    with sigterm_as_exit("export"):  # a stopped export leaves no staging folder: the bundle is complete or absent
        bundle = export_checkpoint(spec, run.ckpt_path, args.format, output, args.atol, model_name=args.model_name, model_version=args.model_version)
    print(f"[pipelines] {spec.name} {args.format} bundle written to {bundle}")
    return bundle
