"""The search space of a sweep: a YAML file mapping runner options to Optuna distributions.

Example ``space.yaml``::

    model.lr: {low: 1.0e-4, high: 1.0e-2, log: true}    # float (log scale)
    model.latent_dim: {low: 4, high: 16, step: 4}       # int: low and high are integers
    model.hidden_dims: {choices: [[64, 32], [128, 64]]} # any YAML values
    data.batch_size: {choices: [64, 128]}

Keys are runner options (``model.*``, ``data.*``, ``trainer.*``, as ``--help`` and
``--print_config`` name them). The file is checked completely before any trial runs: its shape
here (:func:`load_space`), the option names against the domain's resolved config
(:func:`check_option_names`, which also checks the sweep's fixed runner options). Values are
checked by the runner itself: a value it refuses fails that trial (exit 2), recorded in the study.

    >>> space = parse_space({"model.lr": {"low": 0.001, "high": 0.1, "log": True}, "data.batch_size": {"choices": [64, 128]}}, "space.yaml")
    >>> [p.option for p in space]
    ['model.lr', 'data.batch_size']
    >>> parse_space({"model.lr": {"low": 1, "hi": 2}}, "space.yaml")
    Traceback (most recent call last):
    ...
    pipelines.errors.InputError: space.yaml: model.lr: unknown key 'hi' (did you mean 'high'?); a parameter is {low, high[, log][, step]} or {choices: [...]}
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import InputError, did_you_mean
from pipelines.parse_errors import UniqueKeyLoader

SECTIONS = ("model", "data", "trainer")
KEYS = ("low", "high", "log", "step", "choices")
SHAPE = "a parameter is {low, high[, log][, step]} or {choices: [...]}"
#: Runner options a sweep sets itself for each trial.
RESERVED = ("run_id", "runs_dir", "ckpt_path", "trainer.callbacks", "trainer.logger")


@dataclass(frozen=True)
class Parameter:
    """One dimension of the space: a runner option and its distribution."""

    option: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        """The value of this option for ``trial`` (Optuna's ``suggest_*``)."""
        if self.choices is not None:
            labels = [choice_label(c) for c in self.choices]
            return self.choices[labels.index(trial.suggest_categorical(self.option, labels))]
        if isinstance(self.low, int) and isinstance(self.high, int) and (self.step is None or isinstance(self.step, int)):
            return trial.suggest_int(self.option, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.option, float(self.low), float(self.high), step=self.step, log=self.log)

    def describe(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {k: v for k, v in (("low", self.low), ("high", self.high), ("log", self.log or None), ("step", self.step)) if v is not None}


def choice_label(value: Any) -> Any:
    """Optuna's categorical choices must be None/bool/int/float/str: other values (lists, dicts) by their JSON text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def option_value(value: Any) -> str:
    """A value as the runner's command line takes it (YAML/JSON text for non-strings)."""
    return value if isinstance(value, str) else json.dumps(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parameter(option: str, spec: Any, where: str) -> Parameter:
    here = f"{where}: {option}"
    if option.split(".")[0] not in SECTIONS or option.count(".") < 1:
        raise InputError(f"{here}: a sweep searches runner options under {', '.join(s + '.*' for s in SECTIONS)} (e.g. model.lr)")
    if option in RESERVED or any(option.startswith(r + ".") for r in RESERVED):
        raise InputError(f"{here}: set by the sweep for each trial, it cannot be searched")
    if not isinstance(spec, dict) or not spec:
        raise InputError(f"{here}: expected a mapping, got {spec!r}; {SHAPE}")
    for key in spec:
        if key not in KEYS:
            raise InputError(f"{here}: unknown key {key!r}{did_you_mean(str(key), KEYS)}; {SHAPE}")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise InputError(f"{here}: choices cannot be combined with {', '.join(sorted(set(spec) - {'choices'}))}; {SHAPE}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise InputError(f"{here}: choices must be a non-empty list, got {choices!r}")
        labels = [choice_label(c) for c in choices]
        if len({json.dumps(label) for label in labels}) != len(labels):
            raise InputError(f"{here}: choices repeat a value: {choices!r}")
        return Parameter(option, choices=tuple(choices))
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    if not (_number(low) and _number(high)):
        raise InputError(f"{here}: low and high must both be numbers, got low={low!r}, high={high!r}; {SHAPE}")
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and _number(value) and not math.isfinite(value):  # .nan / .inf: YAML numbers, no bound
            raise InputError(f"{here}: {name} must be a finite number, got {value}")
    if not low < high:
        raise InputError(f"{here}: low ({low}) must be smaller than high ({high})")
    if not isinstance(log, bool):
        raise InputError(f"{here}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise InputError(f"{here}: a log scale needs low > 0, got {low}")
    if step is not None and (not _number(step) or step <= 0):
        raise InputError(f"{here}: step must be a positive number, got {step!r}")
    if step is not None and log:
        raise InputError(f"{here}: step and log cannot be combined (Optuna samples a log scale continuously)")
    return Parameter(option, low=low, high=high, log=log, step=step)


def parse_space(document: Any, where: str) -> list[Parameter]:
    """Check the shape of a space (a mapping option -> distribution) and return its parameters."""
    if not isinstance(document, dict) or not document:
        raise InputError(f"{where}: expected a mapping of runner options to distributions, e.g. `model.lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}`")
    return [_parameter(str(option), spec, where) for option, spec in document.items()]


def load_space(path: str | Path) -> list[Parameter]:
    """Read and check a space file; every problem is an :class:`~pipelines.errors.InputError` naming the file."""
    path = Path(path)
    try:
        document = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # a key named twice is refused, as --config does
    except OSError as error:
        raise InputError(f"--space {path}: cannot read it ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        if "appears twice" in str(getattr(error, "problem", "")):  # UniqueKeyLoader: YAML itself would keep the last silently
            raise InputError(f"{path}: {error.problem}; name each option (and each of its keys) once") from None
        mark = getattr(error, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise InputError(f"{path}: not valid YAML{at}: {getattr(error, 'problem', None) or error}") from None
    return parse_space(document, str(path))


def _leaves(config: Any, prefix: str = "") -> set[str]:
    """Every option path of a resolved config (``model.lr``, ``trainer.max_epochs``, ``model.init_args.lr``...)."""
    if not isinstance(config, dict):
        return set()
    paths = set()
    for key, value in config.items():
        path = f"{prefix}{key}"
        paths.add(path)
        paths |= _leaves(value, path + ".")
    return paths


def resolve_runner_config(domain: str, runner_args: list[str]) -> dict[str, Any]:
    """The config a trial's ``fit`` starts from, resolved by the runner's own parser (``--print_config``).

    A fixed option the runner refuses is an :class:`InputError` carrying the runner's own message."""
    from pipelines.run import main as run_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main([domain, "fit", *runner_args, "--print_config"])
        except SystemExit as stop:
            if stop.code not in (0, None):
                lines = [line.strip() for line in err.getvalue().splitlines() if line.strip()]
                detail = next((" ".join(lines[i:]) for i, line in enumerate(lines) if line.startswith("error:")), " ".join(lines[-2:]))
                raise InputError(f"the runner refused the sweep's fixed options {' '.join(runner_args)}: {detail.removeprefix('error: ')}") from None
    config = yaml.safe_load(out.getvalue())
    if not isinstance(config, dict) or "model" not in config:
        raise InputError(f"could not resolve the {domain} config: --print_config gave {out.getvalue()[:300]!r}")
    return config


def check_option_names(space: list[Parameter], config: dict[str, Any], where: str, domain: str) -> None:
    """Refuse an option the domain does not have, with the closest names."""
    known = _leaves({k: config[k] for k in SECTIONS if k in config})
    for parameter in space:
        if parameter.option not in known:
            alike = sorted(k for k in known if k.count(".") == parameter.option.count("."))
            hint = did_you_mean(parameter.option, alike) or f"; `python -m pipelines.run {domain} --help` lists every option"
            raise InputError(f"{where}: {parameter.option} is not an option of {domain}{hint}")
