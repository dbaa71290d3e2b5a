"""Long tables larger than memory (``--data.streaming true``): read in chunks, cached as memory-mapped arrays.

``--data.path`` (CSV, TSV or Parquet) is read ``--data.chunk_rows`` rows at a time (pandas chunks,
Parquet record batches: :func:`table_chunks`), never as a whole table. Chunks are cut at sequence
boundaries (:func:`sequence_groups`: a sequence's rows are never split between two pieces), so each
piece goes through :func:`domains.autonomous.readers.build_tracks` itself, the in-memory path's
checks, NaN rule, sampling rules and gap cuts, and gives the same rows and segments:

1. (``split_by random`` only) the sequence ids, to draw the same seeded split of whole sequences;
2. (no ``--data.time_step`` and no checkpoint's) the steps of the training tracks, whose median is
   the data set's time step, as in memory (8 bytes per training row, held for the median);
3. the build: each piece's rows of each split are validated and written to ``<split>-time.f64``,
   ``-targets.f64``, ``-channels.f32`` and ``-label.f64``; the segments' first rows, lengths and names
   (per segment) beside them.

The rows of a sequence must be together in the file (sorted by sequence, then time; sequences in
any order): a table whose sequences interleave (ETH/UCY's frame-major files) is **refused**, naming
the row where a sequence comes back, not sorted (reading it whole, without ``--data.streaming``,
accepts it). The cache folder (``--data.cache_dir``, default ``$XDG_CACHE_HOME/domain-pipelines/autonomous``)
is keyed by the file's SHA-256 and every option that changes its content; it is written under a
temporary name and renamed when complete, with a size + SHA-256 manifest checked whenever it is
opened: a damaged cache is named, removed and rebuilt (:mod:`pipelines.cache_folders`).

Windows are held as their first rows (:class:`domains.autonomous.windows.WindowStarts`, 16 bytes a
window) and read from the maps per item (:class:`MappedWindows`, with the data module's own window
tensors, so an item is the in-memory path's item); under DDP each rank's sampler gives it its share
of the windows, and only those rows are read. The fitted statistics come from bounded passes over
the training split (:mod:`domains.autonomous.streamed_state`).

Not streamed (refused with the option named): classification, categorical channels, per-group
normalisation, future-known channels, and a time split by fractions (without both cutoffs: it needs every time at once).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pipelines.cache_folders import counted_per_chunk, building, check_cache_dir, default_cache, digest_of, file_manifest, map_array, release, size_mib, usable
from pipelines.errors import InputError
from pipelines.files import sha256_file
from pipelines.splits import SplitRule, assign
from pipelines.time_zones import FirstOfEachKind
from domains.autonomous.readers import (
    LINE, SPLITS, ColumnSpec, Tracks, build_tracks, check_columns, check_present, log, open_table, time_seconds, where, with_origin,
)  # fmt: skip
from domains.autonomous.sampling import infer_time_step
from domains.autonomous.sources import sequence_split
from domains.autonomous.windows import Windows, WindowStarts

logger = logging.getLogger(__name__)
FORMAT = 2  # 2: targets are no longer filled by the NaN rule (a cache of format 1 holds filled ones)
#: rows handed back to the page cache after this many items (resident memory stays flat over an epoch)
RELEASE_EVERY = 256
REPORT_KEYS = ("rows", "nan_rows", "filled_rows", "dropped_rows", "missing_targets", "gaps", "sequences", "segments")


def check_streaming_options(hp: Any) -> None:
    """``--data.streaming`` / ``--data.cache_dir`` / ``--data.chunk_rows``, refused before anything is read or written."""
    check_cache_dir(hp.cache_dir, hp.streaming)
    if hp.chunk_rows < 1:
        raise InputError(f"--data.chunk_rows must be at least 1 (rows read at a time by --data.streaming true), got {hp.chunk_rows}")
    if not hp.streaming:
        return
    if not hp.path:
        got = f"--data.eth_ucy_root {hp.eth_ucy_root}" if hp.eth_ucy_root else "no --data.path (the simulator, held in memory)"
        raise InputError(f"--data.streaming true reads a long table in chunks; got {got}. Give --data.path FILE.csv|.tsv|.parquet, or drop --data.streaming")
    unsupported = [
        ("--data.task classification", hp.task == "classification"),
        (f"--data.categorical_channels {hp.categorical_channels}", bool(hp.categorical_channels)),
        ("--data.normalize_by group", hp.normalize_by == "group"),
        (f"--data.known_future_channels {hp.known_future_channels}", bool(hp.known_future_channels)),
        ("--data.split_by time without both --data.test_after and --data.val_after (a split by fractions of time needs every time at once)",
         hp.split_by == "time" and (hp.test_after is None or hp.val_after is None)),
    ]  # fmt: skip
    named = [option for option, given in unsupported if given]
    if named:
        raise InputError(f"--data.streaming true does not read {'; '.join(named)} yet; drop --data.streaming to read the table whole, or drop that option")


def table_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The rows of a long table, ``chunk_rows`` at a time, with origin columns (the checks of
    :func:`domains.autonomous.readers.read_table` first; a table with a header and no rows is refused)."""
    sep, header = open_table(path)
    with ExitStack() as stack:
        try:
            if sep is None:
                import pyarrow.parquet as pq

                # pre_buffer=False: the default keeps every row group's pre-buffered bytes (memory grows with the file)
                reader = pq.ParquetFile(path, pre_buffer=False)
                batches: Iterator[Any] = (batch.to_pandas() for batch in reader.iter_batches(batch_size=chunk_rows))
            else:
                batches = iter(stack.enter_context(pd.read_csv(path, sep=sep, chunksize=chunk_rows)))
        except Exception as error:  # pandas/pyarrow raise many types; the message is what matters
            raise InputError(f"{path}: cannot read the table: {error}") from None
        offset = 0
        while True:
            try:
                chunk = next(batches, None)
            except Exception as error:
                raise InputError(f"{path}: cannot read the table after data row {offset}: {error}") from None
            if chunk is None:
                break
            if len(chunk) == 0:
                continue
            yield with_origin(chunk.reset_index(drop=True), str(path), offset + 1)
            offset += len(chunk)
    if offset == 0:
        raise InputError(f"{path}: the table has no data rows (columns {header}); expected one row per (sequence, time)")


def sequence_groups(chunks: Iterator[pd.DataFrame], spec: ColumnSpec, require_label: bool = True) -> Iterator[pd.DataFrame]:
    """The chunks cut at sequence boundaries (the last sequence of a chunk waits for the next one); a sequence whose
    rows come back after another sequence's is refused, naming the row (the rows must be grouped by sequence)."""
    carry: pd.DataFrame | None = None
    finished: set[str] = set()
    kinds: list[str] = []
    for number, chunk in enumerate(chunks):
        if number == 0:
            check_columns(chunk, spec, require_label)
        check_present(chunk, spec)
        kinds.append(time_kind(chunk[spec.time]))
        if kinds[-1] != kinds[0]:  # each chunk's times are read as one kind: the whole table must be one kind too
            raise InputError(
                f"{where(chunk, 0)}, column {spec.time!r}: the times of the rows read from here are {kinds[-1]} but earlier rows' are {kinds[0]}; "
                "expected every time as a number (seconds or frames) or every time as ISO 8601 text (e.g. 2024-05-01T13:45:00.100)"
            )
        frame = chunk if carry is None else pd.concat([carry, chunk], ignore_index=True)
        ids = frame[spec.sequence].astype(str).to_numpy()
        runs = np.concatenate([[0], np.flatnonzero(ids[1:] != ids[:-1]) + 1])
        here: set[str] = set()
        for run in runs:
            name = ids[run]
            if name in finished or name in here:
                raise InputError(
                    f"{where(frame, int(run))}, column {spec.sequence!r}: sequence {name!r} comes back after other sequences' rows; "
                    "--data.streaming true reads tables whose rows are grouped by sequence (each sequence's rows together, in time "
                    "order). Sort the file by sequence, then time, or drop --data.streaming to read it whole"
                )
            here.add(name)
        finished.update(ids[runs[:-1]])
        if runs[-1] > 0:
            yield frame.iloc[: runs[-1]]
        carry = frame.iloc[runs[-1] :]
    if carry is not None and len(carry):
        yield carry


def time_kind(values: pd.Series) -> str:
    """``timestamps`` (a datetime column, or text with ISO 8601 dates) or ``numbers``, as
    :func:`domains.autonomous.readers.time_seconds` reads a time column."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return "timestamps"
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return "numbers"
    return "timestamps" if values.astype(str).str.strip().str.match(r"^\d{4}-\d{2}-\d{2}").any() else "numbers"


class StreamedTable:
    """A long table read in chunks into a cache folder of memory-mapped splits (see the module docstring)."""

    def __init__(self, path: Path, spec: ColumnSpec, hp: Any, rule: SplitRule | None, require_label: bool = True) -> None:
        """``rule``: how rows are split (``None``: every row is one ``predict`` split, e.g. a file to score)."""
        self.path, self.spec, self.hp, self.rule, self.require_label = path, spec, hp, rule, require_label
        self.cache_dir = Path(hp.cache_dir) if hp.cache_dir else default_cache("autonomous")
        self.names = SPLITS if rule is not None else ("predict",)
        self.maps: list[Any] = []

    def groups(self) -> Iterator[pd.DataFrame]:
        return sequence_groups(table_chunks(self.path, self.hp.chunk_rows), self.spec, self.require_label)

    def assignments(self) -> Callable[[pd.DataFrame], np.ndarray]:
        """The split of each row of a piece (pass 1 reads the sequence ids of a random split)."""
        rule, source = self.rule, str(self.path)
        if rule is None:
            return lambda group: np.full(len(group), "predict")
        if rule.stable:
            seen = FirstOfEachKind()  # a time column with a time zone in some pieces and without in others is refused as in memory
            return lambda group: assign(rule, group, source, int(group[LINE].iat[0]), seen)
        names: set[str] = set()
        for group in self.groups():
            names.update(group[self.spec.sequence].astype(str).unique())
        hp = self.hp
        split = sequence_split(sorted(names), hp.val_fraction, hp.test_fraction, hp.split_seed)
        return lambda group: group[self.spec.sequence].astype(str).map(split).to_numpy()

    def inferred_step(self, split_of: Callable[[pd.DataFrame], np.ndarray]) -> float:
        """Pass 2: the median step between consecutive rows of the training tracks (as :func:`build_tracks` infers it)."""
        steps = []
        for group in self.groups():
            part = group[split_of(group) == "train"]
            ids = part[self.spec.sequence].astype(str).to_numpy()
            steps.append(np.diff(time_seconds(part, self.spec.time))[ids[1:] == ids[:-1]])
        return infer_time_step(np.concatenate(steps) if steps else np.zeros(0)) or 1.0

    def folder(self, step: float | None) -> Path:
        """The cache folder of this file and these options (built, or checked and reused)."""
        hp = self.hp
        key = {"format": FORMAT, "file": sha256_file(self.path), "spec": asdict(self.spec), "rule": self.rule.as_dict() if self.rule else None,
               "step": step, "nan_policy": hp.nan_policy, "max_gap": hp.max_gap, "time_jitter": hp.time_jitter, "labels": self.require_label,
               "random": [hp.val_fraction, hp.test_fraction, hp.split_seed]}  # fmt: skip
        final = self.cache_dir / f"{self.path.stem}-{digest_of(key)}"
        reused = usable(final, logger)
        if not reused:
            with building(final) as partial:
                self._build(partial, step)
        log(f"streaming cache {final} ({'reused' if reused else 'built'}, {size_mib(final)} MiB)")
        return final

    def _build(self, into: Path, step: float | None) -> None:
        hp, spec = self.hp, self.spec
        split_of = self.assignments()
        step = step if step is not None else self.inferred_step(split_of)
        segments: dict[str, dict[str, list]] = {name: {"starts": [], "lengths": [], "names": []} for name in self.names}
        reports = {name: dict.fromkeys(REPORT_KEYS, 0) for name in self.names}
        rows = dict.fromkeys(self.names, 0)
        labelled = dict.fromkeys(self.names, False)
        with ExitStack() as stack:
            out = {(name, kind): stack.enter_context(open(into / f"{name}-{kind}", "wb"))
                   for name in self.names for kind in ("time.f64", "targets.f64", "channels.f32", "label.f64")}  # fmt: skip
            stack.enter_context(counted_per_chunk("--data.chunk_rows", hp.chunk_rows))
            for group in self.groups():
                split = split_of(group)
                for name in self.names:
                    part = group[split == name]
                    if len(part) == 0:
                        continue
                    tracks = build_tracks(part.reset_index(drop=True), spec, hp.nan_policy, step, hp.max_gap, name, self.require_label, hp.time_jitter)
                    for kind, values in (("time.f64", tracks.time), ("targets.f64", tracks.targets), ("channels.f32", tracks.channels)):
                        out[name, kind].write(np.ascontiguousarray(values).tobytes())
                    if tracks.label is not None:
                        labelled[name] = True
                        out[name, "label.f64"].write(np.ascontiguousarray(tracks.label, dtype=np.float64).tobytes())
                    segments[name]["starts"].append(tracks.starts + rows[name])
                    segments[name]["lengths"].append(tracks.lengths)
                    segments[name]["names"] += tracks.names
                    rows[name] += len(tracks.time)
                    for key in REPORT_KEYS:
                        reports[name][key] += int(tracks.report[key])
        for name in self.names:
            if reports[name]["rows"] == 0:
                described = self.rule.describe() if self.rule else "every row"
                raise InputError(f"{self.path}: split {name!r} is empty under {described}: no rows assigned to it (check --data.split_column or the fractions)")
            for kind in ("starts", "lengths"):
                np.concatenate(segments[name][kind]).astype(np.int64).tofile(into / f"{name}-{kind}.i64")
            (into / f"{name}-names.json").write_text(json.dumps(segments[name]["names"]))
            reports[name]["time_step"] = step
        meta = {"format": FORMAT, "rows": rows, "labelled": labelled, "reports": reports, "files": file_manifest(into)}
        (into / "meta.json").write_text(json.dumps(meta))  # written last, with its manifest

    def tracks(self, step: float | None) -> dict[str, Tracks]:
        """Every split's tracks, their rows memory-mapped from the cache (built first when absent or damaged)."""
        folder = self.folder(step)
        meta = json.loads((folder / "meta.json").read_text())
        targets, channels = len(self.spec.targets), len(self.spec.channels)
        out = {}
        for name in self.names:
            n = meta["rows"][name]
            arrays = {}
            for kind, dtype, width in (("time", np.float64, None), ("targets", np.float64, targets), ("channels", np.float32, channels), ("label", np.float64, None)):
                if width == 0 or (kind == "label" and not meta["labelled"][name]):
                    arrays[kind] = np.zeros((n, 0), dtype=dtype) if width == 0 else None
                    continue
                mapped, arrays[kind] = map_array(folder / f"{name}-{kind}.{'f32' if dtype == np.float32 else 'f64'}", dtype, () if width is None else (width,))
                self.maps.append(mapped)
            starts, lengths = (np.fromfile(folder / f"{name}-{kind}.i64", dtype=np.int64) for kind in ("starts", "lengths"))
            names = json.loads((folder / f"{name}-names.json").read_text())
            report = meta["reports"][name]
            out[name] = Tracks(names, starts, lengths, arrays["time"], arrays["targets"], arrays["channels"], arrays["label"], report)
            log(f"{name}: {report['rows']} rows, {report['sequences']} sequences, {report['nan_rows']} rows with NaN "
                f"({report['filled_rows']} filled by {self.hp.nan_policy!r}, {report['dropped_rows']} dropped), {report['gaps']} time gaps "
                f"(> {self.hp.max_gap:g} x step {report['time_step']:g}) -> {report['segments']} segments (streamed)")  # fmt: skip
        return out


class SegmentNames:
    """The segment name of each window, looked up when asked (no string per window)."""

    def __init__(self, names: list[str], segment: np.ndarray) -> None:
        self.segment_names, self.segment = names, segment

    def __len__(self) -> int:
        return len(self.segment)

    def __getitem__(self, item: int) -> str:
        return self.segment_names[int(self.segment[item])]


class MappedWindows(Dataset):
    """The windows of a memory-mapped split, each built when asked by ``tensors(tracks, windows, split name)`` (the data
    module's: the same items as :class:`domains.autonomous.windows.WindowDataset` over the whole split)."""

    def __init__(self, tracks: Tracks, windows: WindowStarts, tensors: Callable[[Tracks, Windows, str], dict[str, torch.Tensor]], name: str, maps: list[Any]) -> None:
        self.tracks, self.windows, self.tensors, self.name, self.maps = tracks, windows, tensors, name, maps
        self.names = SegmentNames(tracks.names, windows.segment)
        self.served = 0

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, item: int) -> dict[str, Any]:
        out = self.tensors(self.tracks, self.windows.block(item, item + 1), self.name)
        self.served += 1
        if self.served % RELEASE_EVERY == 0:
            release(self.maps)
        return {key: value[0] for key, value in out.items()} | {"index": item}
