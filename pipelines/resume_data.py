"""``fit --ckpt_path`` continues a run on the data it was trained on, or is refused.

A resumed run keeps what the checkpoint fitted on its data (scalers, vocabularies, classes, the split,
the drift reference) and compares its new validation losses with the old ones for ``best.ckpt``. Resumed
on other data, it would scale the new file with the old file's statistics and mix two validation sets in
one series, with nothing said. So on ``fit --ckpt_path``:

- every data option that says *what* is trained on (the source paths, columns, split, seeds, image
  size, ...) must equal the checkpoint's (Lightning saves the data module's options in it); options that
  only say *how* data is read or what ``predict`` writes (:func:`free_on_resume`) may change;
- every file the options name must be the file the run started with: its size and the SHA-256 of its
  first and last MiB are kept in each checkpoint of the run (:class:`DataFilesRecord`), so a rolling
  export replaced in place under the same name is caught without reading a large file whole.

New data means a new run: ``fit`` without ``--ckpt_path`` (or ``pipelines.retrain``, which can start
from the champion's weights with ``--warm_start``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from pipelines.checkpoint_options import same_option_value
from pipelines.errors import InputError
from pipelines.shards import MANIFEST as SHARD_MANIFEST  # a shard set's manifest: the identity of a folder of shards

#: bytes read at each end of a file for its identity
EDGE_BYTES = 1 << 20
#: data options that change how data is read, not what it is, and those of ``predict``/generation
FREE_ON_RESUME = frozenset({"num_workers", "pin_memory", "cache_dir", "streaming", "chunk_rows", "num_generate"})


def free_on_resume(option: str) -> bool:
    """Whether a data option may differ from the checkpoint's when a fit resumes.

    >>> [free_on_resume(o) for o in ("num_workers", "predict_path", "generate_seed", "path", "split_seed")]
    [True, True, True, False, False]
    """
    return option in FREE_ON_RESUME or option.startswith(("predict_", "generate_")) or option.startswith("_")


def data_options(data_cfg: Any) -> dict[str, Any]:
    """The data module's options from a parsed ``data`` section (``init_args`` when it names a class)."""
    if data_cfg is None:
        return {}
    section = data_cfg.as_dict() if hasattr(data_cfg, "as_dict") else dict(data_cfg)
    if isinstance(section.get("init_args"), Mapping):
        section = dict(section["init_args"])
    return section


def file_identity(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of the first and last :data:`EDGE_BYTES` of a file."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            handle.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            digest.update(handle.read(EDGE_BYTES))
    return {"path": str(path), "size": size, "edges_sha256": digest.hexdigest()}


def data_files(options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The identity of every file a data option names (options that may change on resume left out)."""
    found = {}
    for option, value in options.items():
        if not isinstance(value, str) or free_on_resume(option):
            continue
        if Path(value).is_file():
            found[option] = file_identity(Path(value))
        elif (Path(value) / SHARD_MANIFEST).is_file():  # a shard set: its manifest holds every shard's SHA-256
            found[option] = file_identity(Path(value) / SHARD_MANIFEST)
    return found


class DataFilesRecord(Callback):
    """Keeps the identity of the run's data files (:func:`data_files`) in every checkpoint of a ``fit``."""

    def __init__(self, files: dict[str, dict[str, Any]]) -> None:
        self.files = files

    def state_dict(self) -> dict[str, Any]:
        return {"files": self.files}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the files were checked against the checkpoint before the fit (:func:`check_resumed_data`)."""


def check_resumed_data(options: Mapping[str, Any], checkpoint: Mapping[str, Any], label: str) -> None:
    """Refuse (``InputError``) a resumed fit whose data options or files differ from the checkpoint's."""
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    for option, was in saved.items():
        if free_on_resume(option) or option not in options or same_option_value(options[option], was):
            continue
        if options.get("shards") and option != "shards":  # the shard writer's options (checked against its manifest when read)
            continue
        raise InputError(
            f"--data.{option} {options[option]!r}: with {label} the run continues on the data it was trained on "
            f"(--data.{option} {was!r} there): its fitted preprocessing, split and best checkpoint belong to that data. "
            "Leave the option out to resume; to train on other data start a new run (fit without --ckpt_path)"
        )
    recorded = (checkpoint.get("callbacks") or {}).get(DataFilesRecord.__qualname__, {}).get("files", {})
    for option, was in recorded.items():
        if not isinstance(was, Mapping) or not {"path", "size", "edges_sha256"} <= set(was):
            raise InputError(f"{label}: its record of the data file of --data.{option} is damaged ({was!r}); resume from a checkpoint this project wrote, or start a new run")
        path = Path(options.get(option) or was["path"])  # the file this fit would read (the option is unchanged: checked above)
        path = path / SHARD_MANIFEST if path.is_dir() else path
        if not path.is_file():
            raise InputError(f"--data.{option} {path}: with {label} the run continues on this file, which is gone; restore it, or start a new run")
        now = file_identity(path)
        if now["size"] != was["size"] or now["edges_sha256"] != was["edges_sha256"]:
            raise InputError(
                f"--data.{option} {path}: the file changed since the run started ({was['size']} bytes then, {now['size']} now; "
                f"contents differ): with {label} the run would continue on the new contents with the preprocessing fitted on the old. "
                "Start a new run to train on it (fit without --ckpt_path), or restore the file to resume"
            )

