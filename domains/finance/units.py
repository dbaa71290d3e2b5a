"""Whether two finance models' losses are in the same units: their fitted robust scaling compared
(``DomainSpec.units_differences``; retraining compares ``test/loss`` only when this finds nothing)."""

from __future__ import annotations

from typing import Any


#: a robust scale this many times larger or smaller than another's, or a centre moved by this many of its
#: scales, puts two models' inputs (and losses) in different units
UNITS_FACTOR = 4.0


def units_differences(champion: dict[str, Any], challenger: dict[str, Any]) -> list[str]:
    """How two finance checkpoints' fitted preprocessing differs in units (their data module states):
    columns scaled by more than :data:`UNITS_FACTOR` times more or less, or centred that many scales
    apart, and columns one of them does not have. Empty: a loss means the same in both.

    >>> a = {"preprocessor": {"centers": {"amount": 50.0, "age": 40.0}, "scales": {"amount": 30.0, "age": 12.0}}}
    >>> b = {"preprocessor": {"centers": {"amount": 900.0, "age": 41.0}, "scales": {"amount": 4e5, "age": 13.0}}}
    >>> units_differences(a, b)
    ['amount: scale 4e+05 vs 30, centre 900 vs 50']
    """
    mine, theirs = champion.get("preprocessor") or {}, challenger.get("preprocessor") or {}
    found = []
    for column in sorted(set(mine.get("scales", {})) | set(theirs.get("scales", {}))):
        if column not in mine.get("scales", {}) or column not in theirs.get("scales", {}):
            found.append(f"{column}: scaled by only one of the two models")
            continue
        scale, other = float(mine["scales"][column]), float(theirs["scales"][column])
        centre, moved = float(mine["centers"][column]), float(theirs["centers"][column])
        if not max(scale, other) <= UNITS_FACTOR * min(scale, other) or not abs(moved - centre) <= UNITS_FACTOR * scale:
            found.append(f"{column}: scale {other:.3g} vs {scale:.3g}, centre {moved:.3g} vs {centre:.3g}")
    return found
