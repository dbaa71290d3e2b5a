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
  with position noise (GPS or annotation jitter) wanders back and forth: it is not fitted and not judged
  on the :data:`TOO_NEAR` side (a parked car logged in millimetres is not caught: its jitter is small in
  either unit), but every track with a positive step, directed or not (a loop, a round trip), is judged
  on the :data:`TOO_FAR` side;
- the **data's step scale** (:func:`fit_step_scale`, saved in every checkpoint as ``position_step_scale``)
  is the median of the moving training tracks' typical steps;
- a track whose typical step **and** plain median step (of its positive steps) are both :data:`TOO_FAR`
  times the scale or more, or (a moving track) both :data:`TOO_NEAR` of it or less, is refused
  (:func:`check_step_scale`): a unit multiplies every step, a GPS jump makes one long step that can
  cover half a path and alone would move the typical step. The message names the file, the track, both
  scales and the likely unit (named near a factor of 1000; a smaller ratio is only "far outside the real
  spread"). At ``fit`` every split is checked against the training split's scale; at ``test`` and
  ``predict`` the data is checked against the checkpoint's, and the server checks each sequence
  against the bundle's (``domain_metadata.position_step_scale``, :func:`served_step_ratio`).
  Checkpoints and bundles from before the scale was saved carry none: nothing is checked.

The band, from the shipped ETH/UCY data (``../shared/data/autonomous/eth_ucy``, metres at 0.4 s per
step): over the moving tracks of every split of the five leave-one-scene-out folds (about 1000 to 1550
per training split), typical steps lie between 1/58 (a pedestrian who stands, moving 1 or 2 cm twice)
and 5.6 times the training split's scale (runners, cyclists); the simulator's vehicles between 0.28 and
1.6 times their median. Mixed traffic spreads further: walkers at 0.5 m/s among cars at 40 m/s are 80
times apart (0.6 and 33 m/s: 55 times). A unit mistake multiplies a track's steps by 1000 (millimetres
among metres, metres among kilometres) or 100 (centimetres among metres). So :data:`TOO_FAR` = 300
refuses x1000 with a margin of 3.3 and passes the 80 times of mixed traffic with a margin of 3.75;
:data:`TOO_NEAR` = 1/500 refuses a track in metres among millimetres (1/1000) with a margin of 2 and
stays 8 times below the slowest moving pedestrians. Centimetres among metres (x100) and metres among
centimetres (1/100) are inside the real spread and are not caught (nor a millimetre track slower than
0.3 times the data's median speed). ``tests/test_autonomous_units.py`` checks that every
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
TOO_FAR = 300.0
#: a moving track this share of the data's step scale, or less, is in another unit
TOO_NEAR = 1 / 500

UNITS = {3: "millimetres among metres, or metres among kilometres", 2: "centimetres among metres",
         -2: "metres among centimetres", -3: "metres among millimetres, or kilometres among metres"}  # fmt: skip


def step_profile(positions: list[np.ndarray]) -> tuple[float, float, bool] | None:
    """``(typical step, plain median step, directed)`` of one track given as its gap-free segments' positions
    ``(rows, D)``: the length-weighted median of its step lengths, the median of its positive steps and whether
    its motion is directed; ``None`` when it has fewer than 2 steps or none positive (see the module)."""
    steps = [np.linalg.norm(np.diff(p, axis=0), axis=1) for p in positions if len(p) > 1]
    if not steps or sum(len(s) for s in steps) < 2:
        return None
    lengths = np.concatenate(steps)
    positive = lengths[lengths > 0]
    path = float(lengths.sum())
    if not len(positive) or not math.isfinite(path):
        return None
    directed = sum(float(np.linalg.norm(p[-1] - p[0])) for p in positions if len(p) > 1)
    ordered = np.sort(lengths)
    step = float(ordered[np.searchsorted(np.cumsum(ordered), 0.5 * path)])
    return step, float(np.median(positive)), directed >= DIRECTED * path


def typical_step(positions: list[np.ndarray]) -> float | None:
    """The typical step of one track given as its gap-free segments' positions ``(rows, D)``: the
    length-weighted median of its step lengths; ``None`` when it does not move (see the module)."""
    profile = step_profile(positions)
    return profile[0] if profile is not None and profile[2] and profile[0] > 0 else None


def track_profiles(tracks: Tracks) -> list[tuple[str, tuple[float, float, bool]]]:
    """``(sequence name, step profile)`` of every track with a positive step (:func:`step_profile`); a sequence
    split at time gaps is one track (its segments are contiguous and named ``name``, ``name/1``, ...)."""
    if tracks.targets.shape[1] == 0:
        return []
    out: list[tuple[str, tuple[float, float, bool]]] = []
    name, pieces = None, []
    for segment, (start, length) in enumerate(zip(tracks.starts, tracks.lengths)):
        label = tracks.names[segment]
        if name is None or label != f"{name}/{len(pieces)}":
            if name is not None and (profile := step_profile(pieces)) is not None:
                out.append((name, profile))
            name, pieces = label, []
        pieces.append(np.asarray(tracks.targets[start : start + length], dtype=np.float64))
    if name is not None and (profile := step_profile(pieces)) is not None:
        out.append((name, profile))
    return out


def track_steps(tracks: Tracks) -> list[tuple[str, float]]:
    """``(sequence name, typical step)`` of every moving (directed) track."""
    return [(name, step) for name, (step, _, directed) in track_profiles(tracks) if directed and step > 0]


def fit_step_scale(tracks: Tracks) -> float | None:
    """The median typical step of the moving training tracks; ``None`` without one (nothing is checked)."""
    steps = [step for _, step in track_steps(tracks)]
    return float(np.median(steps)) if steps else None


def unit_hint(ratio: float) -> str:
    """What a ratio of typical steps says about the units: a unit is named only near a factor of 1000 or more."""
    power = round(math.log10(ratio))
    if abs(power) < 3:
        return (f"{ratio:.4g} times is far outside the real spread of speeds but not near a unit factor (1000): check the unit "
                f"and the values of its positions")
    unit = UNITS.get(power, "another length unit")
    action = "divide" if ratio > 1 else "multiply"
    return f"about 10^{power}: {unit}? Convert its positions to the data's unit ({action} them by {10 ** abs(power):g})"


def off_ratio(profile: tuple[float, float, bool], scale: float) -> float | None:
    """The ratio to ``scale`` of a track's step (its :func:`step_profile`) when it is off by a unit factor, else ``None``.

    Off only when its typical step and its plain median step are both off, in the same direction (a unit
    multiplies every step; a GPS jump makes one long step): :data:`TOO_FAR` for every track, :data:`TOO_NEAR`
    only for directed ones (a parked track's jitter is tiny in any unit). The ratio is the one nearer to 1."""
    step, median, directed = profile
    weighted, plain = step / scale, median / scale
    if min(weighted, plain) >= TOO_FAR:
        return min(weighted, plain)
    if directed and max(weighted, plain) <= TOO_NEAR:
        return max(weighted, plain)
    return None


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
    profiles = track_profiles(tracks)
    off = [(name, profile, ratio) for name, profile in profiles if (ratio := off_ratio(profile, scale)) is not None]
    if not off:
        return
    name, (step, median, _), ratio = off[0]
    file, rows = locate(name)
    raise InputError(
        f"{file}: track {name!r} ({rows}{split} split) moves {step:.4g} per time step (the typical step length, a length-weighted median, in "
        f"columns {', '.join(repr(c) for c in positions)}; the median step {median:.4g}) but the data's tracks move {scale:.4g} ({reference}): "
        f"{ratio:.4g} times as far. {len(off)} of the {split} split's {len(profiles)} track(s) with steps are off by {TOO_FAR:g} times or more "
        f"(or 1/{1 / TOO_NEAR:g} or less), both their typical and their median step: that is a unit, not a speed: {unit_hint(ratio)}"
    )


def served_step_ratio(positions: np.ndarray, scale: float | None) -> tuple[float, float] | None:
    """``(typical step, ratio to scale)`` of one served sequence's positions ``(T, D)`` when it is off by a unit factor, else ``None``."""
    if not scale:
        return None
    profile = step_profile([np.asarray(positions, dtype=np.float64)])
    ratio = None if profile is None else off_ratio(profile, scale)
    return None if ratio is None else (ratio * scale, ratio)


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
#: the same, at ``fit`` (no checkpoint yet)
FITTED = "the median typical step of the training split's moving tracks"


def check_split_units(dm: Any, fitted: bool) -> None:
    """Every split of a ``SensorSequenceDataModule`` (``dm``, with its fitted or restored state) against the
    data's step scale: the training split's own when ``fitted`` just now, else the checkpoint's."""
    scale = (dm.stats or {}).get(KEY)
    if not scale:
        return
    locate = locator(None if dm.hparams.streaming else dm.tables, dm.hparams.sequence_column, str(dm.hparams.path or "the data"))
    for split, tracks in dm.tracks.items():
        check_step_scale(tracks, scale, split, locate, FITTED if fitted else REFERENCE, dm.position_names)
