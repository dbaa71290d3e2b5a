"""Where ``predict`` writes generated images: a folder of its own, never one an earlier predict filled.

Each ``predict`` writes a new predictions file (``predictions.csv``, ``predictions-2.csv``, ...) that
names its images; writing them into a folder that already holds an earlier predict's images would
replace the files that earlier table describes. So:

- ``--data.generate_dir DIR``: used when it is new or empty; a folder that holds anything (images or
  any other file) is refused (exit 2) before anything is generated;
- otherwise the first of ``<run folder>/generated``, ``generated-2``, ... that is new or empty.

The images are written into a hidden staging folder beside it (``.generated.partial-<pid>``), which
is renamed to its final name after the last batch (:class:`StagedGeneratedFolder`), so the folder is
complete or absent: a predict stopped mid-way (SIGTERM: exit 143, a crash) removes the staging folder
and leaves no ``generated-N`` folder and no predictions file (the CSV is renamed into place after the
folder). Each image is also written under a hidden partial name and renamed: a file is complete or absent.

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
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from pipelines.errors import InputError


def _images_in(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def generated_folder(run_dir: Path, given: str | None) -> Path:
    """The folder this ``predict`` writes its images to (see the module docstring)."""
    if given:
        folder = Path(given)
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--data.generate_dir {folder}: not a folder")
        earlier = sorted(folder.iterdir()) if folder.is_dir() else []
        if earlier:
            images = _images_in(folder)
            what = f"{len(images)} image(s) ({images[0].name}, ...)" if images else f"{len(earlier)} file(s) or folder(s) ({earlier[0].name}, ...)"
            raise InputError(
                f"--data.generate_dir {folder} already holds {what}: predict writes only into a "
                "new or empty folder and never replaces files (an earlier predict's images, which its predictions file names, or any others): "
                "give a new or empty folder, or leave the option out (a new generated-N folder in the run folder)"
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


class StagedGeneratedFolder(pl.Callback):
    """The folder of one ``predict`` (:func:`predict_folder`), filled through a hidden staging folder.

    ``on_predict_start`` chooses the final folder (refusing one that holds earlier images) and creates
    ``.<name>.partial-<pid of rank zero>`` beside it; ``predict_step`` writes there (:attr:`staging`) and
    records the final paths (:attr:`final`); ``on_predict_epoch_end`` (after the last batch, before the
    predictions file is renamed into place in ``on_predict_end``) renames the staging folder to the final
    name. Any exception (SIGTERM, a crash) removes the staging folder: an earlier predict's folders and
    files are never touched. The model hands it to the trainer through ``configure_callbacks``.
    """

    def __init__(self) -> None:
        self.final: Path | None = None
        self.staging: Path | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        final = predict_folder(trainer)
        owner = trainer.strategy.broadcast(os.getpid(), src=0)  # every rank writes into rank zero's staging folder
        self.final, self.staging = final, final.with_name(f".{final.name}.partial-{owner}")
        if trainer.is_global_zero:
            self.staging.mkdir(parents=True)
        trainer.strategy.barrier()

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final is None or self.staging is None:
            return
        trainer.strategy.barrier()  # every rank has written its share
        if trainer.is_global_zero:
            if self.final.is_dir():
                self.final.rmdir()  # new or empty (predict_folder refused one holding images); rmdir refuses anything else
            os.replace(self.staging, self.final)
        self.staging = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.staging is not None and trainer.is_global_zero:
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None
