"""The domain registry: every domain is a :class:`DomainSpec` published in one entry-point group.

A domain package declares, in its ``pyproject.toml``::

    [project.entry-points."pipelines.domains"]
    healthcare = "domains.healthcare:SPEC"

and nothing in ``pipelines/`` changes. Specs name their classes by dotted path so that listing the
domains (or starting one) imports only that domain's own dependencies: starting ``finance`` never
imports MONAI.

Example:
    >>> from pipelines.domain_registry import available_domains, get_domain
    >>> "healthcare" in available_domains()
    True
    >>> get_domain("healthcare").monitor
    'val/auroc'
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

ENTRY_POINT_GROUP = "pipelines.domains"


@dataclass(frozen=True)
class DomainSpec:
    """What the runner needs to know about a domain.

    Args:
        name: the domain name used on the command line.
        model_class: dotted path of the LightningModule (the base class when ``model_subclasses``).
        datamodule_class: dotted path of the LightningDataModule.
        config: the default YAML config shipped beside the domain's code.
        links: ``(data attribute, model argument)`` pairs: values known only from the data (number of
            classes, channels, features, fitted state) that reach the model without being typed.
        monitor: the primary validation metric, used for checkpoint selection (and, unless
            ``selection`` says otherwise, model promotion as its ``test/`` name).
        mode: ``"max"`` when a larger ``monitor`` is better, ``"min"`` otherwise.
        test_metrics: ``(name, direction)`` of every metric the domain's ``test`` can log
            (direction ``"max"``, ``"min"`` or ``""`` when it is not a quality); names may be globs
            (``test/f1_*``). Retraining checks ``--metric`` and ``--floor`` names against it before
            training. Empty: only the ``monitor``'s test name is known.
        selection: the metrics that pick the champion, in order of preference: the first one the
            evaluation reports is used (e.g. AUPRC where labels exist, else the loss). Empty: the
            ``monitor``'s test name.
        sanity_floors: floors every promoted model passes, even the first (``test/loss<inf`` = finite,
            ``test/auroc>0.5`` = better than chance, ``test/loss<baseline`` = better than the same
            network untrained); a floor whose metric the evaluation does not report is skipped.
        unit_dependent_metrics: test metrics measured in the model's own fitted preprocessing units (finance's
            reconstruction loss on robust-scaled features): retraining compares them only between models
            whose preprocessing agrees, as ``units_differences`` tells (:meth:`pipelines.selection.Selection.decide`).
        units_differences: ``module.function`` of ``(champion data state, challenger data state) -> list[str]``:
            how two checkpoints' fitted preprocessing differs in units (empty: they agree); needed with
            ``unit_dependent_metrics``.
        scoring_options: model options that set how a model is measured, not what it is (media: the FID
            feature extractor's settings and cache, sample counts, Inception weights). A checkpoint brings
            its own options to ``test``; retraining scores the champion with the challenger's values of
            these, so both are measured with the same instrument (:func:`pipelines.evaluation_set.align_scoring_options`).
        schema_options: what the data's schema is, which a retraining challenger must share with the champion
            (:mod:`pipelines.retrain_schema`: checked before training, exit 2 otherwise): entries of the data
            module's ``state_dict()`` (``a.b`` reaches into a nested one), or for one it does not hold, the data
            module's attribute of that name (a ``links`` value the checkpoint's hyper-parameters hold). Empty: no check.
        model_subclasses: the config picks one of several LightningModule subclasses of ``model_class``
            with ``model.class_path`` (LightningCLI's subclass mode, e.g. GAN or diffusion); otherwise
            ``--help`` lists every model option directly.
        tags: free-form labels (task type, modality) for documentation and test selection.
        test_args: CLI options for a tiny run, used by the registry-wide test suite.
    """

    name: str
    model_class: str
    datamodule_class: str
    config: Path
    links: tuple[tuple[str, str], ...] = ()
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    test_metrics: tuple[tuple[str, str], ...] = ()
    selection: tuple[str, ...] = ()
    sanity_floors: tuple[str, ...] = ()
    unit_dependent_metrics: tuple[str, ...] = ()
    units_differences: str = ""
    scoring_options: tuple[str, ...] = ()
    schema_options: tuple[str, ...] = ()
    model_subclasses: bool = False
    tags: tuple[str, ...] = ()
    test_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"DomainSpec {self.name!r}: mode must be 'min' or 'max', got {self.mode!r}")
        if not Path(self.config).is_file():
            raise ValueError(f"DomainSpec {self.name!r}: default config {self.config} does not exist")

    def load_model_class(self) -> type:
        """Import and return the LightningModule class."""
        return import_dotted(self.model_class)

    def load_datamodule_class(self) -> type:
        """Import and return the LightningDataModule class."""
        return import_dotted(self.datamodule_class)


def import_dotted(path: str) -> Any:
    """The object a dotted path names (``"domains.healthcare.model.ClassifierTask"``): used for the
    dotted paths a :class:`DomainSpec` declares; never call it with a name read from a file."""
    module_name, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


@cache
def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_domains() -> list[str]:
    """Names of all registered domains, sorted."""
    return sorted(_entry_points())


def get_domain(name: str) -> DomainSpec:
    """Load the spec of one domain; unknown names raise ``ValueError`` listing the valid ones."""
    eps = _entry_points()
    if name not in eps:
        valid = ", ".join(sorted(eps)) or "none (is the project installed? run `pip install -e .`)"
        raise ValueError(f"unknown domain {name!r}; registered domains: {valid}")
    spec = eps[name].load()
    if not isinstance(spec, DomainSpec):
        raise TypeError(f"entry point {name!r} in group {ENTRY_POINT_GROUP!r} must point at a DomainSpec, got {spec!r}")
    return spec
