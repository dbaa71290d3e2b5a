"""One loader for checkpoints from elsewhere: the runner's ``--ckpt_path``, export, the model
registry and retraining read checkpoints and build models through it.

- **Tensors only**: ``torch.load(weights_only=True)`` (memory-mapped where the file allows it); a
  file that is not a Lightning checkpoint readable that way is refused, never unpickled.
- **The class is the domain's**: the model class is the domain's ``model_class``, or a subclass of
  it named by the checkpoint (``hyper_parameters._class_path``, LightningCLI's subclass mode) or by
  a registry version's metadata. A name is looked up among the subclasses already imported (a
  domain's modules import their own); a name outside the domain's package is refused without
  importing anything; a name inside it is imported and must be a subclass of the base class.

Example:
    >>> from pipelines.domain_registry import get_domain
    >>> try:
    ...     model_class(get_domain("finance"), "subprocess.Popen", "x.ckpt")
    ... except CheckpointRefused as refused:
    ...     print(refused)
    x.ckpt: model class 'subprocess.Popen' is not in domain 'finance' (package domains.finance; its model class is domains.finance.model.FraudAutoencoder or a subclass of it); refusing to load
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.domain_registry import DomainSpec, available_domains, get_domain, import_dotted
from pipelines.errors import InputError


class CheckpointRefused(InputError):
    """A checkpoint that is not a weights-only Lightning checkpoint of the expected domain (exit 2)."""


def read_checkpoint(path: str | Path, label: str | None = None) -> dict[str, Any]:
    """A Lightning checkpoint read weights-only (memory-mapped: large checkpoints are not read whole).

    ``label`` names the file in errors (default: its path), e.g. ``--ckpt_path run/best.ckpt``.
    """
    import torch

    label = label or str(path)
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # an older (non-zip) serialisation
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Weights only load failed" in reason:  # torch then suggests weights_only=False: never, for a file from elsewhere
            reason = "it is not a file of tensors: not a checkpoint, or one holding pickled objects, which are never loaded"
        raise CheckpointRefused(f"{label}: not a Lightning checkpoint that loads weights-only ({reason[:200]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointRefused(f"{label}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def domain_package(spec: DomainSpec) -> str:
    """The package a domain's classes live in (``domains.media`` for ``domains.media.model.GenerativeTask``)."""
    return spec.model_class.rpartition(".")[0].rpartition(".")[0]


def recorded_class_path(checkpoint: dict[str, Any]) -> str | None:
    """The model class path a checkpoint records (LightningCLI's subclass mode), if any."""
    value = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    return value if isinstance(value, str) and value else None


def checkpoint_domain(checkpoint: dict[str, Any]) -> str | None:
    """The registered domain a checkpoint comes from, by its model class path or its data module's state key; ``None`` if unknown."""
    class_path = recorded_class_path(checkpoint)
    for name in available_domains():
        other = get_domain(name)
        same_package = class_path is not None and class_path.startswith(domain_package(other) + ".")
        if same_package or other.datamodule_class.rpartition(".")[2] in checkpoint:
            return name
    return None


def check_domain(spec: DomainSpec, checkpoint: dict[str, Any], label: str, fix: str = "") -> None:
    """Refuse a checkpoint of another registered domain, naming both (``fix``: the command that would take it)."""
    origin = checkpoint_domain(checkpoint)
    if origin is not None and origin != spec.name:
        shown = recorded_class_path(checkpoint) or get_domain(origin).model_class
        raise CheckpointRefused(f"{label}: a checkpoint of domain {origin!r} ({shown}), not of domain {spec.name!r}{fix.format(domain=origin)}")


def _imported_subclasses(base: type) -> dict[str, type]:
    found, todo = {f"{base.__module__}.{base.__qualname__}": base}, [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            found[f"{sub.__module__}.{sub.__qualname__}"] = sub
            todo.append(sub)
    return found


def model_class(spec: DomainSpec, class_path: str | None, label: str) -> type:
    """The LightningModule class for ``class_path`` (read from a file: never trusted; ``None``: the domain's own)."""
    base = spec.load_model_class()
    if not class_path or class_path == spec.model_class:
        return base
    found = _imported_subclasses(base)
    if class_path in found:
        return found[class_path]
    package = domain_package(spec)
    if not class_path.startswith(package + "."):  # never import a name read from a file outside the domain
        raise CheckpointRefused(
            f"{label}: model class {class_path!r} is not in domain {spec.name!r} "
            f"(package {package}; its model class is {spec.model_class} or a subclass of it); refusing to load"
        )
    try:
        cls = import_dotted(class_path)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise CheckpointRefused(f"{label}: model class {class_path!r} is not a {base.__qualname__} of domain {spec.name!r}; refusing to load")
    return cls


def build_model(spec: DomainSpec, checkpoint: dict[str, Any], label: str, class_path: str | None = None) -> Any:
    """The checkpoint's LightningModule: its class (:func:`model_class`; ``class_path`` overrides the
    one the checkpoint records), built from its saved hyper-parameters, weights loaded strictly, in eval mode."""
    if "hyper_parameters" not in checkpoint:
        raise CheckpointRefused(f"{label}: not a Lightning checkpoint of a LightningModule (no hyper_parameters)")
    cls = model_class(spec, class_path or recorded_class_path(checkpoint), label)
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    model = cls(**hparams)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.eval()


def datamodule_state(spec: DomainSpec, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The data module state (fitted preprocessing, classes) Lightning saved under the data module's class name."""
    return checkpoint.get(spec.datamodule_class.rpartition(".")[2])
