"""The schema check of a retraining attempt, before training: the data must have the champion's schema.

A challenger replaces the champion behind the same clients (the serving API, the request log, the
monitor's reference) and is compared with it on the same evaluation set, so both must read the same
kind of data: the same feature columns in the same roles and the same label (finance), the same
channels, targets, task and classes (autonomous), the same classes and positive class (healthcare),
also when the classes are inferred from the labels (a class the champion does not know appears in
the data). A night whose data changed schema is refused before anything is trained (exit 2), naming
each difference and advising to map the data back or to start a new registry.

Each domain declares what its schema is, ``DomainSpec.schema_options``: entries of its data module's
fitted state (``state_dict()``, saved in every checkpoint; ``a.b`` reaches into a nested entry), or,
for one the state does not hold, the data module's attribute of that name, which the champion's
checkpoint holds among its hyper-parameters (a ``links`` value such as ``task``). The data of the
attempt is read as training would read it (``prepare_data`` and ``setup("fit")`` of the domain's own
data module, with this attempt's data options), in this process, without a trainer. An entry the
champion's checkpoint does not record (saved before it existed) is not compared.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from typing import Any

from pipelines.model_registry import ModelRegistry
from pipelines.retrain_steps import ExitCode, RetrainError

_MISSING = object()


def _plain(value: Any) -> Any:
    """A JSON view (tuples, numpy values and the like compare as the checkpoint stores them)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _entry(state: Any, name: str) -> Any:
    for part in name.split("."):
        if not isinstance(state, dict) or part not in state:
            return _MISSING
        state = state[part]
    return state


def recorded_schema(spec: Any, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The schema a checkpoint was trained on: each of ``spec.schema_options`` it records."""
    state = checkpoint.get(spec.datamodule_class.rpartition(".")[2]) or {}
    hyper = checkpoint.get("hyper_parameters") or {}
    schema = {}
    for name in spec.schema_options:
        value = _entry(state, name)
        if value is _MISSING and "." not in name and name in hyper:
            value = hyper[name]
        if value is not _MISSING:
            schema[name] = _plain(value)
    return schema


def data_schema(spec: Any, data: dict[str, Any]) -> dict[str, Any]:
    """The schema of the data ``data`` (the resolved config's data section) as training would read it."""
    init = data.get("init_args", {}) if isinstance(data, dict) and "class_path" in data else data
    datamodule = spec.load_datamodule_class()(**init)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # the training says it again
        datamodule.prepare_data()
        datamodule.setup("fit")
        state = datamodule.state_dict()
    schema = {}
    for name in spec.schema_options:
        value = _entry(state, name)
        if value is _MISSING and "." not in name:
            value = getattr(datamodule, name, _MISSING)
        if value is not _MISSING:
            schema[name] = _plain(value)
    return schema


def differences(champion: dict[str, Any], data: dict[str, Any], prefix: str = "") -> list[str]:
    """Each schema entry the champion records that this data has otherwise, in words (nested entries by their ``a.b`` name)."""
    found = []
    for name, old in champion.items():
        new = data.get(name, "(none)")
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, {key: new.get(key, "(none)") for key in {*old, *new}}, f"{prefix}{name}.")
        elif old != new:
            text = f"{prefix}{name}: champion {old!r}, this data {new!r}"
            if isinstance(old, list) and isinstance(new, list):
                unknown, gone = [v for v in new if v not in old], [v for v in old if v not in new]
                text += "".join([f" (not known to the champion: {unknown})" if unknown else "", f" (missing here: {gone})" if gone else ""])
                text += " (the same entries in another order)" if not unknown and not gone else ""
            found.append(text)
    return found


def check(spec: Any, registry: ModelRegistry, champion: str, data: dict[str, Any]) -> None:
    """Refuse (:class:`RetrainError`, exit 2) data whose schema differs from the champion's. Data that cannot be
    read is left to the training, which refuses it the usual way (a failed attempt, exit 1)."""
    if not spec.schema_options:
        return
    recorded = recorded_schema(spec, registry.load_checkpoint(champion))
    if not recorded:
        return
    try:
        found = data_schema(spec, data)
    except Exception as error:  # noqa: BLE001 - unreadable data is the training's to report (exit 1), as without a champion
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"[retrain] schema check: the data could not be read ({type(error).__name__}: {first}); the training reports it", file=sys.stderr)
        return
    changed = differences(recorded, found)
    if changed:
        raise RetrainError(
            ExitCode.USAGE,
            f"this attempt's data has another schema than champion {champion} of {registry.path}: {'; '.join(changed)}. A challenger "
            f"replaces the champion behind the same clients and is compared with it on the same evaluation set, so nothing was trained. "
            f"Map the data back to the champion's schema (its columns, roles, classes and label; e.g. --data.class_names in the "
            f"champion's order), or start a new registry for the new schema (--registry NEW_DIR)",
        )
