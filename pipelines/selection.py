"""Which model wins: the selection metric, the floors and the comparison, checked before training.

A domain declares (:class:`pipelines.domain_registry.DomainSpec`) the test metrics it can log with their
directions, the metrics that select the champion in order of preference (finance: ``test/auprc``
where the evaluation set has labels, else ``test/loss``) and sanity floors every promoted model
must pass, even the first one (finite loss, AUROC better than chance). ``--metric`` overrides the
selection; ``--floor`` adds floors. Every name is checked against the declared metrics before
anything is trained, so a typo costs a second, not a training run.

Example:
    >>> from pipelines.domain_registry import get_domain
    >>> rules = Selection.for_domain(get_domain("finance"), metric=None, floors=[parse_floor("test/f1>=0.2")])
    >>> rules.choose({"test/loss": 0.3, "test/auprc": 0.6, "test/auroc": 0.8, "test/f1": 0.4})
    ('test/auprc', 'max')
    >>> rules.choose({"test/loss": 0.3})
    ('test/loss', 'min')
    >>> rules.failed_floors({"test/loss": float("nan"), "test/auroc": 0.4, "test/f1": 0.5})
    ['test/loss=nan fails <inf (sanity)', 'test/auroc=0.4000 fails >0.5 (sanity)']
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import operator
from dataclasses import dataclass, field
from typing import Any

_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
Floor = tuple[str, str, "float | str"]
#: a floor value that means "the same metric of the untrained model" (a trivial baseline every domain has)
BASELINE = "baseline"


def parse_floor(text: str) -> Floor:
    """``"test/auroc>=0.7"`` -> ``("test/auroc", ">=", 0.7)``; ``inf`` is a value (``test/loss<inf``:
    finite) and so is ``baseline`` (``test/loss<baseline``: better than the same network untrained)."""
    for symbol in (">=", "<=", ">", "<"):
        if symbol in text:
            key, _, value = text.partition(symbol)
            if value.strip() == BASELINE:
                return key.strip(), symbol, BASELINE
            try:
                return key.strip(), symbol, float(value)
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"--floor {text!r}: expected METRIC>=VALUE (or <=, >, <; VALUE a number, inf or baseline), e.g. 'test/auroc>=0.7'")


def floor_text(floor: Floor) -> str:
    key, symbol, value = floor
    return f"{key}{symbol}{value if isinstance(value, str) else format(value, 'g')}"


def evaluation_metric_key(monitor: str) -> str:
    """The test-time name of a validation metric: ``val/auroc`` -> ``test/auroc``."""
    for prefix, replacement in (("val/", "test/"), ("val_", "test_")):
        if monitor.startswith(prefix):
            return replacement + monitor[len(prefix) :]
    raise ValueError(f"DomainSpec.monitor {monitor!r} does not start with 'val/': cannot name its test metric")


def is_improvement(challenger: float, champion: float, mode: str, margin: float) -> bool:
    """Whether ``challenger`` beats ``champion`` by more than ``margin`` in direction ``mode``.

    Example:
        >>> is_improvement(0.91, 0.90, "max", 0.005), is_improvement(0.91, 0.90, "max", 0.02), is_improvement(0.4, 0.5, "min", 0.0)
        (True, False, True)
    """
    if not (math.isfinite(challenger) and math.isfinite(champion)):
        return math.isfinite(challenger)
    gain = challenger - champion if mode == "max" else champion - challenger
    return gain > margin


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)


@dataclass
class Selection:
    """The metric rules of one attempt (see the module docstring)."""

    domain: str
    directions: dict[str, str]  #: declared test metric (glob) -> "max" / "min" / ""
    preference: list[str]  #: selection metrics, first available wins
    sanity: list[Floor] = field(default_factory=list)
    floors: list[Floor] = field(default_factory=list)
    unit_dependent: tuple[str, ...] = ()  #: compared only between models with the same preprocessing units (DomainSpec.unit_dependent_metrics)

    @classmethod
    def for_domain(cls, spec: Any, metric: str | None, floors: list[Floor]) -> Selection:
        """The rules for ``spec`` with ``--metric``/``--floor``; ``ValueError`` (one line, naming the
        option and the valid names) for a name the domain does not log or a metric without direction."""
        monitor_key = evaluation_metric_key(spec.monitor)
        directions = dict(spec.test_metrics) or {monitor_key: spec.mode}
        directions.setdefault(monitor_key, spec.mode)
        rules = cls(spec.name, directions, [metric] if metric else list(spec.selection or [monitor_key]),
                    [parse_floor(f) for f in spec.sanity_floors], list(floors), tuple(spec.unit_dependent_metrics))  # fmt: skip
        known = ", ".join(directions)
        if metric is not None:
            if rules.direction(metric) is None:
                raise ValueError(f"--metric {metric}: {spec.name} logs no such test metric (known: {known})")
            if not rules.direction(metric):
                raise ValueError(f"--metric {metric}: not a quality metric (no better direction); choose one of {', '.join(k for k, v in directions.items() if v)}")
        for floor in floors:
            if rules.direction(floor[0]) is None:
                raise ValueError(f"--floor {floor_text(floor)}: {spec.name} logs no test metric {floor[0]!r} (known: {known})")
        return rules

    @property
    def needs_baseline(self) -> bool:
        """Whether a floor compares with the untrained model (one more evaluation per attempt)."""
        return any(value == BASELINE for _, _, value in self.sanity + self.floors)

    def direction(self, name: str) -> str | None:
        """``"max"``/``"min"``/``""`` for a declared metric, ``None`` for an unknown name."""
        for pattern, direction in self.directions.items():
            if fnmatch.fnmatchcase(name, pattern):
                return direction
        return None

    def choose(self, metrics: dict[str, float]) -> tuple[str, str]:
        """The selection metric the evaluation reports (first preference present), and its direction."""
        for name in self.preference:
            if name in metrics:
                return name, self.direction(name) or "max"
        raise LookupError(f"the evaluation reports none of the selection metrics {self.preference} (it has {sorted(metrics)})")

    def failed_floors(self, metrics: dict[str, float], baseline: dict[str, float] | None = None) -> list[str]:
        """Why ``metrics`` fail the sanity and ``--floor`` floors (empty: they pass). A sanity floor on a
        metric the evaluation does not report is skipped; a ``--floor`` on one fails. A ``baseline``
        floor compares with ``baseline`` (the untrained model's metrics) and is skipped without it.
        A non-finite selection metric always fails: this never relies on the runner catching a divergence."""
        failed = []
        for (key, symbol, value), kind in [*((f, "sanity") for f in self.sanity), *((f, "floor") for f in self.floors)]:
            if key not in metrics:
                if kind == "floor":
                    failed.append(f"{key} not reported by the evaluation (has {sorted(metrics)})")
                continue
            if value == BASELINE:
                if baseline is None or key not in baseline:
                    continue
                value, shown = float(baseline[key]), f"{symbol}{_fmt(float(baseline[key]))} (untrained)"
            else:
                shown = f"{symbol}{value:g}"
            actual = float(metrics[key])
            if not _OPERATORS[symbol](actual, value) or math.isnan(actual):
                failed.append(f"{key}={_fmt(actual)} fails {shown}" + (" (sanity)" if kind == "sanity" else ""))
        with_selection = [name for name in self.preference if name in metrics][:1]
        for name in with_selection:
            if not math.isfinite(float(metrics[name])) and not any(f.startswith(f"{name}=") for f in failed):
                failed.append(f"{name}={_fmt(float(metrics[name]))} is not finite")
        return failed

    def decide(
        self, challenger: dict[str, float], champion: dict[str, Any] | None, margin: float, baseline: dict[str, float] | None = None,
        units_differ: list[str] | None = None,
    ) -> tuple[bool, str, str, str]:  # fmt: skip
        """(promote?, reason, metric, direction) for a challenger's test metrics against the
        champion's ``{"version", "metrics"}`` on the same evaluation set (``None``: first model) and
        the untrained model's metrics ``baseline``. ``units_differ`` names how the two models'
        fitted preprocessing differs: a unit-dependent metric (a loss in each model's own scaled units)
        is then not compared, and the champion stays (a challenger fitted on data in other units, e.g.
        garbage magnitudes, gets a tiny loss on rows its huge scales shrink to nothing)."""
        metric, mode = self.choose(challenger)
        failed = self.failed_floors(challenger, baseline)
        if failed:
            return False, "rejected: " + "; ".join(failed), metric, mode
        score = float(challenger[metric])
        if champion is None:
            return True, f"promoted: first model, {metric}={_fmt(score)} passes the floors", metric, mode
        theirs = float(champion["metrics"].get(metric, math.nan))
        if self.failed_floors(champion["metrics"]):  # a champion below today's floors is beaten by any sane model
            return True, f"promoted: champion {champion['version']} fails the floors ({'; '.join(self.failed_floors(champion['metrics']))})", metric, mode
        if metric in self.unit_dependent and units_differ:
            return False, (
                f"rejected: {metric} is measured in each model's own preprocessing units, and the challenger's differ from champion "
                f"{champion['version']}'s ({'; '.join(units_differ[:3])}{'; ...' if len(units_differ) > 3 else ''}): {_fmt(score)} vs "
                f"{_fmt(theirs)} does not say which model is better. If the new data is right, promote it by hand "
                f"(python -m pipelines.registry {self.domain} promote VERSION)"
            ), metric, mode  # fmt: skip
        better = is_improvement(score, theirs, mode, margin)
        comparison = f"{metric} {_fmt(score)} vs champion {champion['version']} {_fmt(theirs)} ({mode}, margin {margin:g})"
        return better, ("promoted: " if better else "rejected: not better by the margin: ") + comparison, metric, mode
