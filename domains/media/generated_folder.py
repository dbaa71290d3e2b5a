"""Where ``predict`` writes generated images: a folder of its own, never one an earlier predict filled.

Each ``predict`` writes a new predictions file (``predictions.csv``, ``predictions-2.csv``, ...) that
names its images; writing them into a folder that already holds an earlier predict's images would
replace the files that earlier table describes. So:

- ``--data.generate_dir DIR``: used when it is new or empty; a folder that already holds images is
  refused (exit 2) before anything is generated;
- otherwise the first of ``<run folder>/generated``, ``generated-2``, ... that is new or empty.

Each image is written under a hidden partial name and renamed: a file is complete or absent.

Example:
    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> generated_folder(run, None).name
    'generated'
    >>> (run / "generated").mkdir(); _ = (run / "generated" / "00000.png").write_bytes(b"png")
    >>> generated_folder(run, None).name
    'generated-2'
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

from pipelines.errors import InputError


def _images_in(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def generated_folder(run_dir: Path, given: str | None) -> Path:
    """The folder this ``predict`` writes its images to (see the module docstring)."""
    if given:
        folder = Path(given)
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--data.generate_dir {folder}: not a folder")
        earlier = _images_in(folder)
        if earlier:
            raise InputError(
                f"--data.generate_dir {folder} already holds {len(earlier)} image(s) of an earlier predict ({earlier[0].name}, ...), "
                "which an earlier predictions file names; predict never replaces them: give a new or empty folder, "
                "or leave the option out (a new generated-N folder in the run folder)"
            )
        return folder
    for number in itertools.count(1):
        folder = run_dir / ("generated" if number == 1 else f"generated-{number}")
        if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
            return folder
    raise AssertionError("unreachable")


def predict_folder(trainer: Any) -> Path:
    """:func:`generated_folder` for a ``predict`` of ``trainer``, chosen on rank zero and broadcast
    (every process writes its share of the images to the same folder); a refusal stops every rank."""
    given = getattr(getattr(trainer, "datamodule", None), "hparams", {}).get("generate_dir")
    choice: tuple[str, str | None] = ("", None)
    if trainer.is_global_zero:
        try:
            choice = (str(generated_folder(Path(trainer.default_root_dir), given)), None)
        except InputError as error:
            choice = ("", str(error))
    folder, problem = trainer.strategy.broadcast(choice, src=0)
    if problem:
        raise InputError(problem)
    return Path(folder)


def save_png_atomic(image: Any, path: Path) -> None:
    """Save a PIL image as PNG under a hidden partial name, then rename it into place."""
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.png")
    try:
        image.save(partial, format="PNG")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
