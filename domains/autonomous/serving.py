"""Autonomous request forms for ``python -m pipelines.serve autonomous`` (found by convention).

A sequence as a driving team logs it: one object per time step, oldest first, with the sensor
channels named as in training (``domain_metadata.channel_names``, e.g. ``speed``, ``yaw_rate``) and
the positions named as the training ``target_channels`` (``domain_metadata.position_names``, e.g.
``x``, ``y``), for every task; an observation may instead give the positions as one list in that
order, ``"position": [x, y]``::

    {"observations": [{"time": 0.0, "x": 0.0, "y": 0.0, "speed": 12.1, "yaw_rate": 0.01, ...}, ...]}
    {"sequences": [[{...}, ...], [{...}, ...]]}          -> {"predictions": [<one answer per sequence>, ...]}

The answer, by the bundle's task::

    forecasting     {"forecast": [{"step": 1, "ahead": 0.25, "time": 2.0, "x": 31.2, "y": 0.4}, ...]}
    classification  {"prediction": "lane_change_left", "probabilities": {"<class>": 0.8, ...}}
    regression      {"prediction": 0.42, "target": "aggressiveness"}

A quantile model's answer (bundles with ``domain_metadata.quantile_output``) also gives every level,
named by level, and each central interval, named by its level (the median is the prediction)::

    forecasting     each step: ..., "quantiles": {"q10": {"x": .., "y": ..}, ...},
                                    "intervals": {"80%": {"lower": {"x": .., "y": ..}, "median": {..}, "upper": {..}}}
    regression      ..., "quantiles": {"q10": 0.2, "q50": 0.42, "q90": 0.7}, "intervals": {"80%": {"lower": 0.2, "median": 0.42, "upper": 0.7}}

Forecast positions are in the data's units (the bundle de-normalises them). Step ``k`` is ``k``
sampling intervals after the last observation: ``ahead`` is ``k`` times the training data's time
step (``domain_metadata.time_step``, in the time column's units: seconds for the simulator, frames
for ETH/UCY), given with or without request times; when the observations carry ``time``, ``time``
is the last observed time plus ``ahead``. The model reads the last ``observe`` observations (the
length of a training window, ``domain_metadata.observe``): send at least that many; older ones are
checked but not used. ``time`` is optional, in every observation or in none; it must increase, and
the median step of the observations read must be within ``STEP_TOLERANCE`` (10%) of the model's
time step: a sequence sampled at another rate, or timed in other units, is refused, since the model
would misread its displacements; so is a gap or an irregular step among the observations read (each
step within 10% of the time step, as in every training window).

Bundles exported before ``position_names`` and ``time_step`` were recorded still serve, as before
those fields: a forecaster's positions are named by its ``target_names``, a classifier's or
regressor's are read only as a ``position`` list; forecast steps get ``ahead`` and ``time`` only
from request times (the median observed step), and no time step is checked.

Covariates (categorical channels, the group of per-group normalisation, future-known values in
``"future"``) are read by :mod:`domains.autonomous.serving_covariates`.

Positions in another length unit than training's (``domain_metadata.position_step_scale``: the typical
step of the moving training tracks; millimetres sent to a model trained in metres move 1000 times as
far per step) are refused, naming the sequence, both scales and the likely unit
(:mod:`domains.autonomous.position_units`); bundles without the scale are not checked.

Errors are 422s naming the sequence, observation and channel, e.g. ``observations[3].speed: expected
a number; got 'fast'``. Imports numpy, ``pipelines.serve`` and ``pipelines.bundle_runtime`` (the intervals).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from domains.autonomous.position_units import KEY as STEP_SCALE_KEY, served_step_ratio, unit_hint
from domains.autonomous.serving_covariates import RequestCovariates
from pipelines.bundle_runtime import intervals_of, quantiles_of
from pipelines.serve import RequestAdapter, json_ready, reject

TIME = "time"
AHEAD = "ahead"
POSITION = "position"
STEP_TOLERANCE = 0.1
"""How far a request's median time step may be from the bundle's ``time_step``, relative to it."""
FLOAT32_MAX = float(np.finfo(np.float32).max)


class ObservationsAdapter(RequestAdapter):
    """``{"observations": [{channel: number, ...}, ...]}`` -> the forecast, class or value of one sequence."""

    name = "observations"
    key = "observations"

    def __init__(self, metadata: dict[str, Any]) -> None:
        super().__init__(metadata)
        domain = metadata["domain_metadata"]
        self.task: str = domain["task"]
        self.observe = int(domain["observe"])
        self.output_name = self.output_names[0]
        self.class_names: list[str] = list(domain.get("class_names") or [])
        self.target_names: list[str] = list(domain.get("target_names") or [])
        self.channel_names: list[str] = list(domain.get("channel_names") or [])
        self.position_dim = int(self.input_specs["past"]["shape"][-1])
        recorded = domain.get("position_names")  # None (or absent) in bundles exported before it was recorded
        self.position_names: list[str] = list(recorded if recorded is not None else self.target_names if self.task == "forecasting" else [])
        step = domain.get("time_step")  # likewise
        self.time_step: float | None = None if step is None else float(step)
        if (len(self.channel_names) != self.input_specs["channels"]["shape"][-1] or len(self.position_names) not in (0, self.position_dim)
                or (self.time_step is not None and not self.time_step > 0)):  # fmt: skip
            raise ValueError(f"bundle metadata names channels {self.channel_names}, positions {self.position_names} and time step {self.time_step} "
                             f"for inputs of shapes {self.input_specs['channels']['shape']} and {self.input_specs['past']['shape']}")  # fmt: skip
        scale = domain.get(STEP_SCALE_KEY)  # None (or absent) in bundles exported before it was recorded: not checked
        self.step_scale: float | None = None if scale is None else float(scale)
        self.covariates = RequestCovariates(domain, domain.get("predict") or 0, number)  # categories, group, future-known values
        self.named_positions = len(self.position_names) == self.position_dim
        self.has_quantiles = bool(domain.get("quantile_output"))  # None (or absent) in bundles exported before intervals were
        self.fields: list[str] = [*self.position_names, *self.channel_names]
        self.listed_fields: list[str] = [POSITION, *self.channel_names]
        shown = self.fields if self.named_positions else self.listed_fields
        row = "{" + ", ".join([f'"{TIME}": <optional>', *(f'"{f}": {"[..]" if f == POSITION else "<number>"}' for f in shown)]) + "}"
        alternative = f'; or the positions as one list "{POSITION}": [..]' if self.named_positions and self.position_dim else ""
        self.example = f"{self.wrap(row + ', ...')}  (oldest first, at least {self.observe}{alternative}{self.covariates.example(self.key)})"

    def wrap(self, observations: str) -> str:
        """What a request of this form looks like around a sequence's observations (for ``example``)."""
        return f'{{"{self.key}": [{observations}]}}'

    def accepts(self, request: dict[str, Any]) -> bool:
        return self.key in request

    def count_items(self, request: dict[str, Any]) -> int | None:
        """Sequences in the request (``--max_items``), read before any is decoded."""
        return len(request[self.key]) if self.key == "sequences" and isinstance(request.get(self.key), list) else 1

    # ----- request -> model inputs and context ---------------------------------------------------
    def sequences(self, request: dict[str, Any]) -> list[tuple[Any, str]]:
        """The request's sequences with the field that names each in errors."""
        return [(request[self.key], self.key)]

    def decode(self, request: dict[str, Any]) -> dict[str, np.ndarray]:
        """``past`` (centred on the last observed position) and ``channels`` of the last ``observe`` observations;
        ``origin`` (that position, float64), ``last_time`` and ``time_step`` (NaN when unknown)."""
        unexpected = sorted(set(request) - {self.key, self.covariates.future_key(self.key)})
        if unexpected:
            reject(unexpected[0], f"unexpected field; the {self.name} form is {self.example}")
        sequences = self.sequences(request)
        parsed = [self.sequence(rows, where) for rows, where in sequences]
        values = np.stack([p[0] for p in parsed])
        covariates = [self.covariates.read(rows[-self.observe :], len(rows) - self.observe, request, self.key, j if self.key == "sequences" else None, where)
                      for j, (rows, where) in enumerate(sequences)]  # fmt: skip
        # centred on the last observed position in float64 before the float32 cast, as in training (UTM-sized
        # coordinates keep their precision); the origin is added back to the forecast in float64
        origin = values[:, -1, : self.position_dim].copy()
        return {
            "past": np.ascontiguousarray(values[..., : self.position_dim] - origin[:, None], dtype=np.float32),
            "origin": origin,
            "channels": np.ascontiguousarray(values[..., self.position_dim :], dtype=np.float32),
            "last_time": np.array([p[1] for p in parsed], dtype=np.float64),
            "time_step": np.array([p[2] for p in parsed], dtype=np.float64),
            **{name: np.stack([c[name] for c in covariates]) for name in covariates[0]},  # codes, group, known (serving_covariates.py)
        }

    def sequence(self, rows: Any, where: str) -> tuple[np.ndarray, float, float]:
        """One sequence's last ``observe`` observations ``(observe, positions + channels)``, its last time (NaN
        without times) and the time step of its forecast (the bundle's; for an older bundle the median
        observed step, NaN without times)."""
        if not isinstance(rows, list) or not rows:
            got = "an empty list" if rows == [] else type(rows).__name__
            reject(where, f"expected a list of observations (objects, oldest first); got {got}")
        if len(rows) < self.observe:
            reject(where, f"{len(rows)} observation(s); this model reads the last {self.observe}: send at least {self.observe}, oldest first")
        timed = isinstance(rows[0], dict) and TIME in rows[0]
        values = np.array([self.observation(row, f"{where}[{i}]", timed) for i, row in enumerate(rows)], dtype=np.float64)
        self.check_units(values[-self.observe :, : self.position_dim], where)
        if not timed:
            return values[-self.observe :], math.nan, math.nan if self.time_step is None else self.time_step
        times = values[:, -1]
        backwards = np.flatnonzero(np.diff(times) <= 0)
        if backwards.size:
            i = int(backwards[0]) + 1
            reject(f"{where}[{i}].{TIME}", f"{times[i]:g} is not after the previous observation's time {times[i - 1]:g}; send observations oldest first")
        observed = float(np.median(np.diff(times[-self.observe :])))  # observe >= 2 (the data module's rule)
        if self.time_step is None:
            return values[-self.observe :, :-1], float(times[-1]), observed
        if abs(observed - self.time_step) > STEP_TOLERANCE * self.time_step:
            reject(where, f"the last {self.observe} observations are {observed:g} apart in {TIME!r} (median); this model was trained on data "
                          f"sampled every {self.time_step:g} (in the training time column's units): resample the sequence, or check its time unit")  # fmt: skip
        steps = np.diff(times[-self.observe :]) / self.time_step  # training windows never span a gap or an irregular step (trial finding: one was read as a step's motion)
        off = np.flatnonzero(np.abs(steps - 1) > STEP_TOLERANCE)
        if off.size:
            i = len(rows) - self.observe + int(off[0]) + 1
            reject(f"{where}[{i}].{TIME}", f"{times[i]:g} is {steps[off[0]]:.3g} time steps after the previous observation ({times[i - 1]:g}); this model "
                                           f"reads its last {self.observe} observations {self.time_step:g} apart (+-{STEP_TOLERANCE:.0%}), as every training "
                                           "window was: a gap or an irregular step inside them would be read as one step's motion. Send gap-free "
                                           "observations (resample, or start the sequence after the gap)")  # fmt: skip
        return values[-self.observe :, :-1], float(times[-1]), self.time_step

    def check_units(self, positions: np.ndarray, where: str) -> None:
        """A 422 when the positions read move a unit factor further (or less far) per step than the training tracks
        (``domain_metadata.position_step_scale``; none in older bundles): :mod:`domains.autonomous.position_units`."""
        off = served_step_ratio(positions, self.step_scale) if positions.shape[1] else None
        if off is not None:
            names = self.position_names or [POSITION]
            reject(where, f"the positions {names} of the last {self.observe} observations move {off[0]:.4g} per time step (their typical step "
                          f"length) but this model's training tracks moved {self.step_scale:.4g}: {off[1]:.4g} times as far; that is a unit, not "
                          f"a speed: {unit_hint(off[1])}")  # fmt: skip

    def observation(self, row: Any, where: str, timed: bool) -> list[float]:
        """Positions, channels (and time, when ``timed``) of one observation, checked; positions named or as one list."""
        if not isinstance(row, dict):
            reject(where, f"expected an object {{channel: number}}; got {type(row).__name__}")
        listed = POSITION in row or not self.named_positions
        fields = self.listed_fields if listed else self.fields
        twice = [name for name in self.position_names if name in row] if listed else []
        if twice:
            reject(f"{where}.{twice[0]}", f"positions given twice, named {self.position_names} and as the list {POSITION!r}; give one")
        missing = [f for f in fields if f not in row]
        if missing:
            reject(f"{where}.{missing[0]}", f"missing channel; every observation needs {fields}")
        unknown = sorted(str(f) for f in row if f not in fields and f != TIME and f not in self.covariates.text_fields)
        if unknown:
            reject(f"{where}.{unknown[0]}", f"unknown field; observations have the channels {fields} and optionally {TIME!r}")
        if (TIME in row) != timed:
            reject(f"{where}.{TIME}", f"give {TIME!r} in every observation or in none")
        values: list[float] = []
        for field in fields:
            if field == POSITION:
                position = row[field]
                order = self.position_names if self.named_positions else "the training target_channels"
                if not isinstance(position, list) or len(position) != self.position_dim:
                    reject(f"{where}.{field}", f"expected a list of {self.position_dim} numbers ({order}, in that order); got {position!r}"[:300])
                values += [number(v, f"{where}.{field}[{j}]") for j, v in enumerate(position)]
            else:
                values.append(number(row[field], f"{where}.{field}"))
        return values + [number(row[TIME], f"{where}.{TIME}")] if timed else values

    # ----- model outputs -> answer ---------------------------------------------------------------
    def answers(self, outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """One answer per sequence of this request."""
        out = outputs[self.output_name]
        if self.task == "classification":
            names = self.class_names or [str(i) for i in range(out.shape[1])]
            return [{"prediction": names[int(np.argmax(p))], "probabilities": dict(zip(names, json_ready(p)))} for p in out]
        spread = self.spread(outputs)
        if self.task == "regression":
            answers = [{"prediction": json_ready(value), "target": self.target_names[0] if self.target_names else None} for value in out]
            return [answer | spread(i, json_ready) for i, answer in enumerate(answers)]
        answers = []
        origins = outputs.get("origin", np.zeros((len(out), out.shape[-1])))
        for i, (positions, origin, last, step) in enumerate(zip(out, origins, outputs["last_time"], outputs["time_step"])):
            positions = positions.astype(np.float64) + origin
            forecast = []
            for k, point in enumerate(json_ready(positions), 1):
                timing: dict[str, float] = {} if math.isnan(step) else {AHEAD: _decimal(k * step)}
                if not math.isnan(last):
                    timing[TIME] = _decimal(last + k * step)
                at_step = self.positions_at(k - 1, origin)
                forecast.append({"step": k, **timing, **dict(zip(self.position_names, point)), **spread(i, at_step)})
            answers.append({"forecast": forecast})
        return answers

    def positions_at(self, step: int, origin: np.ndarray) -> Any:
        """An item's quantile positions ``(predict, D)`` -> step ``step``'s named positions in the data's units."""
        return lambda values: dict(zip(self.position_names, json_ready(values[step].astype(np.float64) + origin)))

    def spread(self, outputs: dict[str, np.ndarray]) -> Any:
        """``spread(item, shown)``: a quantile model's ``quantiles`` and ``intervals`` of one item, each value given as
        ``shown(item's array)`` makes it (a number, or a step's named positions); ``{}`` for other models."""
        if not self.has_quantiles:
            return lambda item, shown: {}
        levels, intervals = quantiles_of(self.metadata, outputs), intervals_of(self.metadata, outputs)
        return lambda item, shown: {
            "quantiles": {name: shown(values[item]) for name, values in levels.items()},
            "intervals": {name: {bound: shown(values[item]) for bound, values in bounds.items()} for name, bounds in intervals.items()},
        }

    def encode(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.covariates.annotate(self.answers(outputs), outputs)[0]


def _decimal(value: float) -> float:
    """``value`` to 12 significant digits: 3 x 0.1 is answered as 0.3, not 0.30000000000000004."""
    return float(f"{value:.12g}")


class SequencesAdapter(ObservationsAdapter):
    """``{"sequences": [[{channel: number, ...}, ...], ...]}`` -> ``{"predictions": [...]}``, one per sequence, in order."""

    name = "sequences"
    key = "sequences"

    def wrap(self, observations: str) -> str:
        return f'{{"{self.key}": [[{observations}], ...]}}'

    def sequences(self, request: dict[str, Any]) -> list[tuple[Any, str]]:
        sequences = request[self.key]
        if not isinstance(sequences, list) or not sequences:
            got = "an empty list" if sequences == [] else type(sequences).__name__
            reject(self.key, f"expected a list of sequences (each a list of observations); got {got}")
        return [(rows, f"{self.key}[{j}]") for j, rows in enumerate(sequences)]

    def encode(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"predictions": self.covariates.annotate(self.answers(outputs), outputs)}


def number(value: Any, where: str) -> float:
    """A finite JSON number within the float32 range (the model's inputs), or a 422 naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        reject(where, f"expected a number; got {value!r}"[:200])
    if not (isinstance(value, float) and math.isfinite(value) or isinstance(value, int)) or abs(value) > FLOAT32_MAX:
        reject(where, f"expected a finite number within the float32 range; got {value!r}"[:200])
    return float(value)


ADAPTERS = [ObservationsAdapter, SequencesAdapter]
