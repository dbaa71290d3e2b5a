"""Loading a registry version without trusting its files (mixed into :class:`pipelines.model_registry.ModelRegistry`).

Weights come from safetensors, the rest of the checkpoint from ``torch.load(weights_only=True)``,
after :meth:`verify_version` checked every file against ``SHA256SUMS``; the model class is the
registered domain's own, never one imported from a name written in a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WEIGHTS_FILE = "model.safetensors"
EXTRAS_FILE = "checkpoint_extras.pt"


class RegistryError(RuntimeError):
    """A registry folder or request that is not what was expected (the message names the path)."""


class LoadingMixin:
    """``load_weights``, ``load_checkpoint``, ``write_checkpoint``, ``model_class``, ``load_model``."""

    domain: str

    def load_weights(self, version: str | None = None) -> dict[str, Any]:
        """The LightningModule ``state_dict`` of a version (default: the champion), from safetensors."""
        from safetensors.torch import load_file

        version = self.resolve(version)
        self.verify_version(version)
        return load_file(str(self.version_dir(version) / WEIGHTS_FILE))

    def load_checkpoint(self, version: str | None = None) -> dict[str, Any]:
        """A Lightning checkpoint dict of a version (weights + hyper-parameters + data module state),
        read without unpickling code: safetensors and ``torch.load(weights_only=True)``."""
        import torch

        version = self.resolve(version)
        weights = self.load_weights(version)
        checkpoint = torch.load(self.version_dir(version) / EXTRAS_FILE, map_location="cpu", weights_only=True)
        checkpoint["state_dict"] = weights
        return checkpoint

    def write_checkpoint(self, version: str | None, path: Path) -> Path:
        """Write a version as a ``.ckpt`` the runner's ``--ckpt_path`` accepts (for ``test``/``predict``)."""
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.load_checkpoint(version), path)
        return path

    def model_class(self, version: str) -> type:
        """The LightningModule class of a version: the registered domain's ``model_class``, or (for a
        domain with ``model_subclasses``) the subclass of it whose dotted name the metadata records,
        looked up among the already-imported subclasses. Nothing named in a file is imported."""
        from pipelines.registry import get_domain

        spec = get_domain(self.domain)
        base = spec.load_model_class()
        wanted = self.metadata(version).get("model_class") or spec.model_class
        found, todo = {f"{base.__module__}.{base.__qualname__}": base}, [base]
        while todo:
            for sub in todo.pop().__subclasses__():
                found[f"{sub.__module__}.{sub.__qualname__}"] = sub
                todo.append(sub)
        if wanted not in found:
            raise RegistryError(f"{self.version_dir(version) / 'metadata.json'}: model class {wanted!r} is not {spec.model_class} of domain {self.domain!r} or a subclass of it; refusing to load")
        return found[wanted]

    def load_model(self, version: str | None = None) -> Any:
        """Build the version's LightningModule from its saved hyper-parameters and load its weights
        (strict), in eval mode. The class is the registered domain's (:meth:`model_class`)."""
        version = self.resolve(version)
        checkpoint = self.load_checkpoint(version)
        model_class = self.model_class(version)
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        model = model_class(**hparams)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
        return model.eval()

