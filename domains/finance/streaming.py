"""Transaction tables larger than memory (``--data.streaming true``): read in chunks, cached as memory-mapped arrays.

A CSV or Parquet source is read chunk by chunk (:func:`domains.finance.sources.iter_chunks`: pandas
chunks, Parquet record batches) twice, never as a whole table:

1. **scan** (:meth:`StreamedTable.scan_folder`): every value of every chunk is checked as the
   in-memory path checks it (the same :class:`TablePreprocessor.check_values`, naming the row; timestamps with and
   without a time zone in different chunks are refused too: :class:`domains.finance.parsing.TimestampZones`, and so in
   ``--data.time_column``, feature or not, in the in-memory words: :class:`pipelines.time_zones.FirstOfEachKind`), the
   labels and the stable split rule's assignment are read, and each feature column is written parsed
   to its own file (numbers as float64, booleans 0/1/NaN, categoricals as codes of a dictionary).
   The split is then drawn by :func:`domains.finance.splitting.split_of` with the same random
   generator calls as the in-memory path, so every rule gives the same rows per split.
2. **fit** (:meth:`StreamedTable.fit`): the preprocessing is fitted by :meth:`TablePreprocessor.fit`
   itself, one column at a time, on that column's training values read back from its file: the
   same numbers (medians, robust scales, ranges, vocabularies) as fitting the whole table.
3. **encode** (:meth:`StreamedTable.encoded_folder`): each chunk is encoded with the fitted
   preprocessing and appended to ``numeric.f32`` / ``categorical.i64``.

Everything lands in ``--data.cache_dir`` (default ``$XDG_CACHE_HOME/domain-pipelines/finance``, ``~/.cache``) in a folder
keyed by the file's SHA-256 and the options that change its content (roles, label classes, split
rule, mode; the encoded arrays also by the fitted preprocessing): a second run on the same file skips
the scan, a ``test`` with the checkpoint's preprocessing reuses the encoding. Each folder is written
under a temporary name and renamed when complete (:func:`pipelines.cache_folders.building`: a crash leaves no
half cache; two DDP ranks building the same cache race harmlessly). Its ``meta.json``, written last,
lists every file's size and SHA-256; a cache is checked against it whenever it is opened, and a
damaged one (a file cut short, overwritten, missing) is named, removed and rebuilt, never read. The
log names the cache folder, whether it was built or reused, and its size. Batches come from
:class:`domains.finance.mapped_rows.MappedRows`.

Memory: held per row are the labels (4 bytes) and the split (1 byte) while scanning; the fit holds
one column of the training rows at a time (8 bytes a row, a few times that inside ``np.percentile``),
the random split a permutation (8 bytes a row). The pandas table (hundreds of bytes a row) never exists.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from domains.finance.parsing import MISSING, TimestampZones, category_text, parse_boolean, parse_labels, parse_numeric, parse_timestamp
from domains.finance.preprocessing import UNKNOWN, ColumnRoles, TablePreprocessor
from domains.finance.source_checks import TABLE_SUFFIXES, check_both_classes, check_roles_cover, check_unique_ids, id_hashes
from domains.finance.sources import iter_chunks, read_header
from domains.finance.splitting import check_mode, split_of
from pipelines.cache_folders import building, counted_per_chunk, check_cache_dir, default_cache, digest_of, discard, file_manifest, size_mib, usable
from pipelines.errors import InputError
from pipelines.files import sha256_file
from pipelines.splits import SPLITS, SplitRule, assign, check_column, parse_times, time_split
from pipelines.time_zones import FirstOfEachKind

log = logging.getLogger(__name__)

FORMAT = 3  # 2: meta.json lists every file's size and SHA-256, checked when the cache is opened; 3: and the timestamp kinds
NO_STREAMED_PREDICT = "--data.streaming true scores a file: give it with --data.predict_path (the test split is scored by `test`)"


def split_codes(split: np.ndarray) -> np.ndarray:
    """``train``/``val``/``test`` as int8 codes 0/1/2."""
    codes = np.zeros(len(split), dtype=np.int8)
    for code, name in enumerate(SPLITS):
        codes[split == name] = code
    return codes


class StreamedTable:
    """A CSV/Parquet transaction table read in chunks into a cache folder (see the module docstring)."""

    def __init__(
        self, path: Path, roles: ColumnRoles, rule: SplitRule, mode: str, label_classes: list[Any], chunk_rows: int,
        cache_dir: Path | None, source_name: str,
    ) -> None:  # fmt: skip
        self.path, self.roles, self.rule, self.mode, self.label_classes = path, roles, rule, mode, label_classes
        self.chunk_rows, self.source_name = chunk_rows, source_name
        if not path.is_file():
            raise InputError(f"--data.path {path}: file not found")
        self.header = read_header(path)  # UTF-8, one value per column, every column named once
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache("finance")
        self._folder: Path | None = None
        self._built = False  # whether this process built the scan folder (discard_if_built)
        self._checked: set[Path] = set()  # encoded folders checked (or built) by this process

    # ----- the scan -------------------------------------------------------------------------------
    def feature_files(self) -> dict[str, str]:
        """Parsed column -> its file name in the scan folder."""
        r = self.roles
        files = {c: f"value-{i}.f64" for i, c in enumerate([*r.numeric_columns, *r.amount_columns, *r.boolean_columns])}
        files.update({c: f"present-{i}.u8" for i, c in enumerate(r.timestamp_columns)})
        files.update({c: f"code-{i}.i32" for i, c in enumerate(r.categorical_columns)})
        return files

    @property
    def folder(self) -> Path:
        """The scan folder (built on first use)."""
        if self._folder is None:  # every column has a role before anything is written (the scan writes the cache)
            check_roles_cover(pd.DataFrame(columns=self.header), self.roles, self.rule, self.source_name)
            key = {"format": FORMAT, "file": sha256_file(self.path), "roles": vars(self.roles), "labels": [str(c) for c in self.label_classes],
                   "rule": self.rule.as_dict(), "mode": self.mode}  # fmt: skip
            final = self.cache_dir / f"{self.path.stem}-{digest_of(key)}"
            reused = usable(final, log)
            if not reused:
                with building(final) as partial:
                    self._scan(partial)
            log.info(f"streaming cache {final} ({'reused' if reused else 'built'}, {size_mib(final)} MiB)")
            self._folder, self._built = final, not reused
        return self._folder

    def discard_if_built(self) -> None:
        """Remove the scan folder this process built, when the data it holds were then refused (a check that needs the
        whole scan, e.g. a numeric column with no training value): a refused input leaves no cache behind."""
        if self._folder is not None and self._built:
            discard(self._folder)
            self._folder, self._built = None, False

    def _scan(self, into: Path) -> None:
        r, rule, source = self.roles, self.rule, self.source_name
        checker = TablePreprocessor(r, label_classes=self.label_classes)  # parsing needs no fitted state
        labels: list[np.ndarray] = []
        ids: list[np.ndarray] = []
        stable: list[np.ndarray] = []
        times: list[np.ndarray] = []
        kinds: set[bool] = set()
        zones = TimestampZones()  # a timestamp column's kind (with or without a zone) across chunks
        time_zones = FirstOfEachKind()  # the same for the time split's column (a feature or not)
        dictionaries: dict[str, dict[str, int]] = {c: {} for c in r.categorical_columns}
        n = 0
        with ExitStack() as stack:
            out = {c: stack.enter_context(open(into / name, "wb")) for c, name in self.feature_files().items()}
            stack.enter_context(counted_per_chunk("--data.predict_chunk_rows", self.chunk_rows))
            for offset, chunk in iter_chunks(self.path, self.chunk_rows):
                if rule.by == "time":  # before the features' checks: a time column that is a feature too is refused as in memory
                    check_column(list(chunk.columns), rule.time_column, "time_column", source)
                    values, is_datetime = parse_times(chunk[rule.time_column], rule.time_column, source, offset + 1, time_zones)
                    times.append(values)
                    kinds.add(is_datetime)
                checker.check_values(chunk, source, offset, zones)
                ids.append(id_hashes(chunk, r.id_columns))
                if r.label_column is not None:
                    if r.label_column not in chunk.columns:
                        raise InputError(
                            f"{source}: --data.label_column {r.label_column!r} is missing; the file has columns {list(chunk.columns)} "
                            "(without labels: --data.mode unsupervised --data.label_column null)"
                        )
                    labels.append(parse_labels(chunk[r.label_column], self.label_classes, source, offset))
                if rule.stable and rule.by != "time":
                    stable.append(split_codes(assign(rule, chunk, source, offset + 1)))
                for column in [*r.numeric_columns, *r.amount_columns]:
                    out[column].write(parse_numeric(chunk[column], source, offset).astype(np.float64).tobytes())
                for column in r.boolean_columns:
                    out[column].write(parse_boolean(chunk[column], source, offset).astype(np.float64).tobytes())
                for column in r.timestamp_columns:
                    out[column].write(parse_timestamp(chunk[column], source, offset).notna().to_numpy(dtype=np.uint8).tobytes())
                for column in r.categorical_columns:
                    codes = dictionaries[column]
                    text = category_text(chunk[column])
                    out[column].write(np.fromiter((codes.setdefault(v, len(codes)) for v in text), np.int32, len(text)).tobytes())
                n += len(chunk)
        if n == 0:
            raise InputError(f"{source}: the table has no rows (only a header); expected one row per transaction")
        check_unique_ids(np.concatenate(ids), r.id_columns, source)  # 8 bytes a row
        label = np.concatenate(labels) if labels else None
        if label is not None:
            check_both_classes(label, r.label_column, self.label_classes, source)
        check_mode(label, self.mode)
        if rule.by == "time":
            if len(kinds) > 1:
                raise InputError(
                    f"{source}: column {rule.time_column!r} (--data.time_column) holds numbers in some rows and ISO 8601 times in others; "
                    "expected one kind in every row"
                )
            assignment = time_split(np.concatenate(times), rule, kinds.pop())
        else:
            assignment = np.asarray(SPLITS)[np.concatenate(stable)] if rule.stable else None
        split = split_codes(split_of(n, label, assignment, rule, self.mode, source, rule.val_fraction, rule.test_fraction, rule.seed))
        split.tofile(into / "split.i8")
        (label if label is not None else np.full(n, -1.0, np.float32)).astype(np.float32).tofile(into / "label.f32")
        for code, name in enumerate(SPLITS):
            np.flatnonzero(split == code).astype(np.int64).tofile(into / f"rows-{name}.i64")
        meta = {"format": FORMAT, "rows": n, "labelled": label is not None, "dictionaries": {c: list(d) for c, d in dictionaries.items()},
                "timestamp_zones": zones.kinds, "files": file_manifest(into)}  # fmt: skip
        (into / "meta.json").write_text(json.dumps(meta))

    # ----- what the scan holds ----------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / "meta.json").read_text())

    @property
    def labels(self) -> np.ndarray | None:
        """0/1 per row (float32), or None without a label column."""
        return np.fromfile(self.folder / "label.f32", dtype=np.float32) if self.meta["labelled"] else None

    @property
    def split(self) -> np.ndarray:
        """int8 split code per row (``SPLITS`` index)."""
        return np.fromfile(self.folder / "split.i8", dtype=np.int8)

    def rows(self, name: str) -> np.ndarray:
        return np.fromfile(self.folder / f"rows-{name}.i64", dtype=np.int64)

    def fit_rows(self) -> np.ndarray:
        """The rows the preprocessing is fitted on: train, and in ``semi_supervised`` mode only its normal rows."""
        rows = self.rows("train")
        if self.mode == "semi_supervised":
            rows = rows[self.labels[rows] == 0]
        return rows

    # ----- fit -------------------------------------------------------------------------------------
    def fit(self, categorical_encoding: str, max_categories: int, min_category_count: int) -> TablePreprocessor:
        """:meth:`TablePreprocessor.fit` one numeric column at a time on the training values, vocabularies from the codes
        (:meth:`vocabulary`): the same state as the whole table's fit."""
        r, folder, files = self.roles, self.folder, self.feature_files()
        rows = self.fit_rows()
        options = {"categorical_encoding": categorical_encoding, "max_categories": max_categories, "min_category_count": min_category_count}
        fitted = TablePreprocessor(r, label_classes=self.label_classes, **options)
        fitted.notes = []
        for role in ("numeric_columns", "amount_columns", "boolean_columns"):
            for column in getattr(r, role):
                values = np.fromfile(folder / files[column], dtype=np.float64)[rows]
                if role == "boolean_columns":  # fit parses text; the parsed values give its share of true directly
                    if np.isnan(values).all():
                        raise InputError(f"{self.source_name}: column {column!r} is empty (all {len(values)} training values are missing)")
                    fitted.true_share[column] = float(np.nanmean(values))
                    continue
                one = TablePreprocessor(ColumnRoles(**{role: [column]}), label_classes=self.label_classes, **options)
                one.fit(pd.DataFrame({column: values}), self.source_name, rows)
                for state in ("medians", "centers", "scales", "lows", "highs"):
                    getattr(fitted, state).update(getattr(one, state))
                fitted.notes += one.notes
        for column in r.timestamp_columns:
            present = np.fromfile(folder / files[column], dtype=np.uint8)[rows]
            if not present.any():
                raise InputError(f"{self.source_name}: column {column!r} is empty (all {len(present)} training values are missing)")
        fitted.timestamp_zones = dict(self.meta.get("timestamp_zones", {}))  # one kind in the whole file: the training rows
        for column in r.categorical_columns:  # (the whole table's fit checks them in this order)
            fitted.vocabularies[column], fitted.unknown_shares[column] = self.vocabulary(column, rows, max_categories, min_category_count)
        fitted.fitted = True
        return fitted

    def split_rows(self, name: str, preprocessor: TablePreprocessor) -> Any:
        """The rows of split ``name`` encoded by ``preprocessor``, served from the cache (:class:`domains.finance.mapped_rows.MappedRows`)."""
        from domains.finance.mapped_rows import MappedRows

        return MappedRows(self.folder, self.encoded_folder(preprocessor), name, self.mode == "semi_supervised")

    def vocabulary(self, column: str, rows: np.ndarray, max_categories: int, min_category_count: int) -> tuple[list[str], float]:
        """:meth:`TablePreprocessor.fit`'s vocabulary of a categorical column, from its codes (no string per row): the most
        frequent ``max_categories`` values seen ``min_category_count`` times, ties in order of first appearance (pandas'
        stable ``value_counts``), with the same refusals; and the share of rows it maps to ``<unknown>``."""
        dictionary = np.asarray(self.meta["dictionaries"][column], dtype=object)
        codes = np.fromfile(self.folder / self.feature_files()[column], dtype=np.int32)[rows]
        uniques, first, counts = np.unique(codes, return_index=True, return_counts=True)
        order = np.lexsort((first, -counts))
        values, counts = dictionary[uniques[order]], counts[order]
        if (values == MISSING).all():
            raise InputError(f"{self.source_name}: column {column!r} is empty (all {len(rows)} training values are missing)")
        if len(values) < 2:
            raise InputError(
                f"{self.source_name}: categorical column {column!r} has only one value ({values[0]!r}) in the {len(rows)} "
                "training rows; it carries no information: remove it from categorical_columns"
            )
        kept = counts >= min_category_count
        kept[np.flatnonzero(kept)[max_categories:]] = False
        return [UNKNOWN, *sorted(str(v) for v in values[kept])], float(1.0 - counts[kept].sum() / len(rows))

    # ----- encode ----------------------------------------------------------------------------------
    def encoded_folder(self, preprocessor: TablePreprocessor) -> Path:
        """``numeric.f32`` (rows x features) and ``categorical.i64`` (rows x columns) of every row, encoded by ``preprocessor``."""
        state = preprocessor.state_dict()
        final = self.folder / f"encoded-{digest_of(state)}"
        if final not in self._checked and not usable(final, log):
            with building(final) as partial:
                with open(partial / "numeric.f32", "wb") as numeric, open(partial / "categorical.i64", "wb") as categorical:
                    for offset, chunk in iter_chunks(self.path, self.chunk_rows):
                        encoded = preprocessor.transform(chunk, self.source_name, offset)
                        numeric.write(np.ascontiguousarray(encoded["numeric"], dtype=np.float32).tobytes())
                        categorical.write(np.ascontiguousarray(encoded["categorical"], dtype=np.int64).tobytes())
                layout = {"numeric": len(preprocessor.numeric_feature_names), "categorical": len(preprocessor.categorical_cardinalities)}
                (partial / "meta.json").write_text(json.dumps({**layout, "files": file_manifest(partial)}))  # written last, with its manifest
        self._checked.add(final)
        return final


def check_streaming_options(path: str | None, streaming: bool, cache_dir: str | None) -> None:
    """``--data.streaming`` / ``--data.cache_dir``, refused (:class:`InputError`) before anything is read or written."""
    check_cache_dir(cache_dir, streaming)
    if not streaming:
        return
    if not path or not str(path).lower().endswith(TABLE_SUFFIXES):
        got = f"--data.path {path}" if path else "no --data.path (the synthetic set, held in memory)"
        raise InputError(f"--data.streaming true reads a CSV or Parquet file in chunks; got {got}. Give --data.path FILE.csv|.parquet, or drop --data.streaming")


def training_reference(train: Any, names: list[str], source: str) -> dict[str, Any]:
    """:func:`pipelines.reference.fit_reference` of the encoded training split's numeric features; a mapped split
    (``MappedRows``) one feature at a time (the same statistics without the whole split in memory)."""
    from pipelines.reference import fit_reference

    if not hasattr(train, "column"):  # EncodedRows, in memory
        return fit_reference(pd.DataFrame(train.numeric.numpy(), columns=names), source=source, input_name="numeric")
    reference: dict[str, Any] | None = None
    for j, name in enumerate(names):
        one = fit_reference(pd.DataFrame({name: train.column(j)}), source=source, input_name="numeric")
        if reference is None:
            reference = one
        else:
            reference["features"].update(one["features"])
    reference = reference or fit_reference(pd.DataFrame(columns=names), source=source, input_name="numeric")
    reference["columns"] = list(names)
    return reference
