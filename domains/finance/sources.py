"""Reading transaction files: CSV/Parquet tables (whole or streamed in chunks) and ADBench ``.npz``.

Every reader checks what it reads before anything uses it and raises
:class:`pipelines.errors.InputError` naming the file (and the row and column):

- the header as written in the file (a CSV's first line, a Parquet schema) must name every column
  once (:func:`pipelines.validation.check_unique_columns`; pandas would rename a repeated ``amount``
  to ``amount.1`` and it would go unused);
- a CSV must be UTF-8 text (:func:`pipelines.csv_text.check_csv_text` names the line, column and byte
  of the first byte that is not, e.g. a Latin-1 ``é``);
- an empty file, or a file that cannot be parsed as CSV/Parquet/npz, is refused with the file's name;
- an ADBench ``.npz`` needs ``X`` (rows x features, finite numbers within float32's range) and ``y``
  (0/1, one per row).

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = path.write_text("amount,shop,amount\\n1,a,2\\n")
    >>> try:
    ...     read_header(path)
    ... except InputError as error:
    ...     print(str(error).removeprefix(f"{path}: "))
    the header names column 'amount' 2 times (columns 1, 3); every column name must be unique
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.errors import InputError
from pipelines.csv_text import check_csv_text, check_delimiter
from pipelines.validation import check_finite_columns, check_unique_columns, describe_rows


def _csv_header(path: Path) -> list[str]:
    check_csv_text(path)  # a Latin-1 byte anywhere, or a short row (a file cut short): refused naming line and column
    with open(path, newline="", encoding="utf-8-sig") as handle:
        try:
            first = next(csv.reader(handle), None)
        except (csv.Error, UnicodeDecodeError) as error:
            raise InputError(f"{path}: cannot read the header as CSV text: {error}") from None
    if not first or not any(cell.strip() for cell in first):
        raise InputError(f"{path}: the file is empty; expected a header line naming the columns, then one line per transaction")
    check_delimiter(first, str(path))
    return first


def read_header(path: Path) -> list[str]:
    """Column names as written in a CSV or Parquet file, each named once. A CSV's rows are scanned (not
    parsed into a frame): it must be UTF-8 and every line must have one value per column."""
    if path.suffix.lower() == ".csv":
        columns = _csv_header(path)
    else:
        import pyarrow.parquet as pq

        try:
            columns = list(pq.read_schema(path).names)
        except Exception as error:  # pyarrow's errors: ArrowInvalid, OSError
            raise InputError(f"{path}: cannot read as Parquet: {error}") from None
    check_unique_columns(columns, str(path))
    return columns


def read_table(path: Path) -> pd.DataFrame:
    """A whole CSV (every cell as text, so values pass through unchanged) or Parquet file."""
    read_header(path)  # a repeated column is refused before pandas renames it
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        return pd.read_parquet(path)
    except (ValueError, OSError) as error:  # pandas' ParserError / EmptyDataError, pyarrow's ArrowInvalid
        raise InputError(f"{path}: cannot read as {path.suffix.lstrip('.').upper()}: {str(error).strip().splitlines()[0]}") from None


def iter_chunks(source: Path | pd.DataFrame, chunk_rows: int) -> Iterator[tuple[int, pd.DataFrame]]:
    """``(offset of the first row, rows)`` chunks of a file (streamed) or a frame."""
    if isinstance(source, pd.DataFrame):
        for start in range(0, len(source), chunk_rows):
            yield start, source.iloc[start : start + chunk_rows]
        return
    offset = 0
    if source.suffix.lower() == ".csv":
        try:
            with pd.read_csv(source, dtype=str, keep_default_na=False, chunksize=chunk_rows) as reader:
                for chunk in reader:
                    yield offset, chunk.reset_index(drop=True)
                    offset += len(chunk)
        except pd.errors.ParserError as error:  # a malformed line deep in the file (e.g. an extra field)
            raise InputError(f"{source}: cannot read as CSV after data row {offset}: {str(error).strip().splitlines()[0]}") from None
        return
    import pyarrow.parquet as pq

    # pre_buffer=False: with pyarrow's default (True) the reader keeps the pre-buffered ranges of every row group read
    # so far (~32 MiB more per million rows scored in benchmarks/RESULTS.md's 20M-row row): memory grew with the file
    for batch in pq.ParquetFile(source, pre_buffer=False).iter_batches(batch_size=chunk_rows):
        chunk = batch.to_pandas()
        yield offset, chunk
        offset += len(chunk)


def read_adbench_npz(path: Path) -> pd.DataFrame:
    """An ADBench ``.npz`` (``X`` rows x features, ``y`` 0/1) as a frame ``x0 .. x{d-1}, label``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "X" not in archive or "y" not in archive:
                raise InputError(f"{path}: an ADBench .npz needs arrays 'X' (rows x features) and 'y' (0/1 per row), found {sorted(archive.files)}")
            features, labels = np.asarray(archive["X"]), np.asarray(archive["y"]).reshape(-1)
    except InputError:
        raise
    except (OSError, ValueError) as error:  # not a zip, a pickled object array, a truncated file
        raise InputError(f"{path}: cannot read as .npz: {error}") from None
    if features.dtype.kind not in "biuf":
        raise InputError(f"{path}: X must hold numbers, got dtype {features.dtype}")
    if features.ndim != 2 or len(features) != len(labels):
        raise InputError(f"{path}: X must be 2-D with one row per label, got X {features.shape} and y {labels.shape}")
    frame = pd.DataFrame(features.astype(np.float64), columns=[f"x{i}" for i in range(features.shape[1])])
    check_finite_columns(frame, f"{path} (X)", frame.columns)
    with np.errstate(invalid="ignore"):
        bad = ~np.isin(labels, (0, 1)) if labels.dtype.kind in "biuf" else np.ones(len(labels), dtype=bool)
    if bad.any():
        raise InputError(
            f"{path}: y must hold 0 (normal) and 1 (anomaly); {describe_rows(np.flatnonzero(bad) + 1)} hold{'s' if bad.sum() == 1 else ''} "
            f"{sorted({str(v) for v in labels[bad].tolist()})[:5]}"
        )
    frame["label"] = labels.astype(np.int64)
    return frame
