"""Positions in another length unit than the rest of the data: one track in millimetres among metres.

The model reads positions as per-step displacements divided by one scale fitted on the training split
(:mod:`domains.autonomous.fitted_state`): a track logged in millimetres among tracks in metres moves 1000
times as far per step, trains silently (it dominates that scale) and, in a ``predict`` file or a served
request, is forecast as nonsense. Speeds differ for real too (a parked and a moving vehicle by 100-300
times), so a track is judged by how far it moves *when it moves*, against the moving tracks of the data:

- a track's **typical step** is the length-weighted median of its step lengths (the Euclidean norm over
  the ``target_channels``, between consecutive rows of one gap-free segment): half of its path is
  covered in steps at least this long. It is its cruising speed, even when it stands still most of the
  time (a pedestrian who walks in, then waits for 250 frames, in ETH/UCY's zara02);
- a track is **moving** when that step is positive and its motion is directed: over its segments, the
  distance from first to last position is at least :data:`DIRECTED` of the path length. Standing still
  with position noise (GPS or annotation jitter) wanders back and forth and is neither fitted nor judged
  (a parked car logged in millimetres is not caught: it moves nowhere in either unit);
- the **data's step scale** (:func:`fit_step_scale`, saved in every checkpoint as ``position_step_scale``)
  is the median of the moving training tracks' typical steps;
- a moving track whose typical step is :data:`TOO_FAR` times the scale or more, or :data:`TOO_NEAR` of
  it or less, is refused (:func:`check_step_scale`), naming the file, the track, both scales and the
  likely unit. At ``fit`` every split is checked against the training split's scale; at ``test`` and
  ``predict`` the data is checked against the checkpoint's, and the server checks each sequence
  against the bundle's (``domain_metadata.position_step_scale``, :func:`served_step_ratio`).
  Checkpoints and bundles from before the scale was saved carry none: nothing is checked.

The band, from the shipped ETH/UCY data (``../shared/data/autonomous/eth_ucy``, metres at 0.4 s per
step): over the moving tracks of every split of the five leave-one-scene-out folds (about 1000 to 1550
per training split), typical steps lie between 1/58 (a pedestrian who stands, moving 1 or 2 cm twice)
and 5.6 times the training split's scale (runners, cyclists); the simulator's vehicles between 0.28 and
1.6 times their median. A unit mistake multiplies a track's steps by 1000 (millimetres among metres,
metres among kilometres) or 100 (centimetres among metres). So :data:`TOO_FAR` = 50 refuses x100 and
x1000 with a margin of 2 and stays 9 times above the real spread (a car at 35 m/s among walkers at
1.3 m/s is 27 times); :data:`TOO_NEAR` = 1/500 refuses a track in metres among millimetres (1/1000) with
a margin of 2 and stays 8 times below the slowest moving pedestrians. Metres among centimetres (1/100)
is inside the real spread and is not caught. ``tests/test_autonomous_units.py`` checks that every
shipped fold passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.errors import InputError

if TYPE_CHECKING:  # the server imports this module: numpy only, no pandas
    from domains.autonomous.readers import Tracks

#: the key of the fitted state (the data module's ``state_dict``, every checkpoint, bundle metadata)
KEY = "position_step_scale"
#: a track moves (is fitted and judged) when its first-to-last distances are at least this share of its path
DIRECTED = 0.5
#: a moving track this many times the data's step scale, or more, is in another unit (see the module's band)
TOO_FAR = 50.0
#: a moving track this share of the data's step scale, or less, is in another unit
TOO_NEAR = 1 / 500

UNITS = {3: "millimetres among metres, or metres among kilometres", 2: "centimetres among metres",
         -2: "metres among centimetres", -3: "metres among millimetres, or kilometres among metres"}  # fmt: skip


def typical_step(positions: list[np.ndarray]) -> float | None:
    """The typical step of one track given as its gap-free segments' positions ``(rows, D)``: the
    length-weighted median of its step lengths; ``None`` when it does not move (see the module)."""
    steps = [np.linalg.norm(np.diff(p, axis=0), axis=1) for p in positions if len(p) > 1]
    if not steps or sum(len(s) for s in steps) < 2:
        return None
    lengths = np.concatenate(steps)
    path = float(lengths.sum())
    directed = sum(float(np.linalg.norm(p[-1] - p[0])) for p in positions if len(p) > 1)
    ordered = np.sort(lengths)
    step = float(ordered[np.searchsorted(np.cumsum(ordered), 0.5 * path)]) if path > 0 else 0.0
    return step if step > 0 and math.isfinite(step) and directed >= DIRECTED * path else None


def track_steps(tracks: Tracks) -> list[tuple[str, float]]:
    """``(sequence name, typical step)`` of every moving track; a sequence split at time gaps is one track
    (its segments are contiguous and named ``name``, ``name/1``, ...)."""
    if tracks.targets.shape[1] == 0:
        return []
    out: list[tuple[str, float]] = []
    name, pieces = None, []
    for segment, (start, length) in enumerate(zip(tracks.starts, tracks.lengths)):
        label = tracks.names[segment]
        if name is None or label != f"{name}/{len(pieces)}":
            if name is not None and (step := typical_step(pieces)) is not None:
                out.append((name, step))
            name, pieces = label, []
        pieces.append(np.asarray(tracks.targets[start : start + length], dtype=np.float64))
    if name is not None and (step := typical_step(pieces)) is not None:
        out.append((name, step))
    return out


def fit_step_scale(tracks: Tracks) -> float | None:
    """The median typical step of the moving training tracks; ``None`` without one (nothing is checked)."""
    steps = [step for _, step in track_steps(tracks)]
    return float(np.median(steps)) if steps else None


def unit_hint(ratio: float) -> str:
    """What a ratio of typical steps says about the units."""
    power = round(math.log10(ratio))
    unit = UNITS.get(int(np.clip(power, -3, 3)), "another length unit")
    action = "divide" if ratio > 1 else "multiply"
    return f"about 10^{power}: {unit}? Convert its positions to the data's unit ({action} them by {10 ** abs(power):g})"


def off_scale(ratio: float) -> bool:
    return ratio >= TOO_FAR or ratio <= TOO_NEAR


def check_step_scale(tracks: Tracks, scale: float | None, split: str, locate: Callable[[str], tuple[str, str]], reference: str,
                     positions: list[str]) -> None:
    """Refuse the first moving track of ``tracks`` whose typical step is off ``scale`` by a unit factor.

    Args:
        scale: the data's step scale (``None``: nothing to check against).
        split: the split (or ``predict``), for the message.
        locate: ``sequence name -> (file, "rows a to b, " or "")``: where the track is (:func:`locator`).
        reference: what ``scale`` is, e.g. ``the median over the moving tracks of the training split``.
        positions: the position columns (``target_channels``).
    """
    if not scale:
        return
    steps = track_steps(tracks)
    off = [(name, step) for name, step in steps if off_scale(step / scale)]
    if not off:
        return
    name, step = off[0]
    ratio = step / scale
    file, rows = locate(name)
    raise InputError(
        f"{file}: track {name!r} ({rows}{split} split) moves {step:.4g} per time step (the typical step length, a length-weighted median, in "
        f"columns {', '.join(repr(c) for c in positions)}) but the data's tracks move {scale:.4g} ({reference}): {ratio:.4g} times as far. "
        f"{len(off)} of the {split} split's {len(steps)} moving track(s) are off by {TOO_FAR:g} times or more (or 1/{1 / TOO_NEAR:g} or less): "
        f"that is a unit, not a speed: {unit_hint(ratio)}"
    )


def served_step_ratio(positions: np.ndarray, scale: float | None) -> tuple[float, float] | None:
    """``(typical step, ratio to scale)`` of one served sequence's positions ``(T, D)`` when it is off by a unit factor, else ``None``."""
    if not scale:
        return None
    step = typical_step([np.asarray(positions, dtype=np.float64)])
    if step is None or not off_scale(step / scale):
        return None
    return step, step / scale


def locator(tables: dict[str, Any] | None, sequence_column: str, fallback: str) -> Callable[[str], tuple[str, str]]:
    """``sequence name -> (file, "rows a to b, ")`` from the split tables (their bookkeeping columns ``_file`` and
    ``_line``); without tables (a streamed file) ``(fallback, "")``."""
    from domains.autonomous.readers import FILE, LINE

    def locate(name: str) -> tuple[str, str]:
        for table in (tables or {}).values():
            rows = table[table[sequence_column].astype(str) == name]
            if len(rows):
                return str(rows[FILE].iat[0]), f"rows {int(rows[LINE].min())} to {int(rows[LINE].max())}, "
        return fallback, ""

    return locate


#: what the stored scale is, in messages
REFERENCE = "the median typical step of the training split's moving tracks, saved in the checkpoint"


def check_split_units(dm: Any) -> None:
    """Every split of a ``SensorSequenceDataModule`` (``dm``, with its fitted or restored state) against the
    data's step scale: at ``fit`` the training split's own, at ``test`` the checkpoint's."""
    scale = (dm.stats or {}).get(KEY)
    if not scale:
        return
    locate = locator(None if dm.hparams.streaming else dm.tables, dm.hparams.sequence_column, str(dm.hparams.path or "the data"))
    for split, tracks in dm.tracks.items():
        check_step_scale(tracks, scale, split, locate, REFERENCE, dm.position_names)
