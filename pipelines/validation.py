"""The validation layer every domain's reader uses: values, labels and columns are checked here.

Each check raises :class:`pipelines.errors.InputError` (a ``ValueError``) naming the file, the
rows (1-based data rows, the header not counted) and the column, and saying what was expected, so
that ``python -m pipelines.run`` refuses the input with exit status 2 before anything is written.

Rules, for every domain:

- **Values**: NaN, +-inf and magnitudes beyond float32's range (``3.4e38``: such a value becomes inf
  in the float32 tensors the models use) are refused. Readers that allow missing values (e.g.
  finance's categorical columns) say so in their own documentation.
- **Labels**: a label that is one edit away from another one (``covid`` / ``COVID-19`` / ``covid19``)
  or a class with fewer than ``min_rows`` rows is refused unless the user lists the classes
  (``class_names``); a label outside a declared list is refused with the closest declared name.
- **Columns**: duplicated headers are refused (pandas would silently rename the second to ``x.1``).
- **Text files** (CSV/TSV), in one pass before pandas reads them (:func:`check_csv_text`): UTF-8 (a
  byte-order mark is allowed; the first other byte is named by line, data row, column and byte, e.g. a
  Latin-1 ``é``), and one value per header column on every row (a file cut short is refused).
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import itertools
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import InputError, did_you_mean

#: The largest finite float32: larger magnitudes turn into inf in a float32 tensor.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def describe_rows(rows: Sequence[int] | np.ndarray, limit: int = 5) -> str:
    """``row 3`` / ``rows 3, 9, 12`` / ``rows 3, 9, 12, 20, 31 and 7 more`` (rows as given).

    Example:
        >>> describe_rows([3]), describe_rows([1, 2, 3, 4, 5, 6, 7], limit=3)
        ('row 3', 'rows 1, 2, 3 and 4 more')
    """
    rows = [int(r) for r in rows]
    head = ", ".join(str(r) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {head}{more}"


def non_finite_problem(values: np.ndarray) -> tuple[np.ndarray, str] | None:
    """Where ``values`` (numeric, any shape with rows first) hold NaN, inf or float32 overflow.

    Returns ``(mask over the first axis, what was found)`` or ``None`` when every value is fine.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "fc" or values.size == 0:
        if values.dtype.kind in "iu" and values.size and np.abs(values.astype(np.float64)).max() > FLOAT32_MAX:
            return np.abs(values.reshape(len(values), -1).astype(np.float64)).max(axis=1) > FLOAT32_MAX, "a value beyond float32's range"
        return None
    flat = values.reshape(len(values), -1) if values.ndim > 1 else values.reshape(-1, 1)
    kinds = []
    nan, inf = np.isnan(flat), np.isinf(flat)
    with np.errstate(invalid="ignore", over="ignore"):
        huge = ~inf & ~nan & (np.abs(flat.astype(np.float64)) > FLOAT32_MAX)
    for mask, label in ((nan, "NaN"), (inf, "inf"), (huge, f"a magnitude beyond float32's range ({FLOAT32_MAX:.3g})")):
        if mask.any():
            kinds.append(label)
    if not kinds:
        return None
    return (nan | inf | huge).any(axis=1), " and ".join(kinds)


def check_finite(values: Any, where: str, column: str | None = None, first_row: int = 1) -> None:
    """Refuse NaN, inf and float32 overflow in ``values`` (rows first), naming rows and column.

    Args:
        values: an array (or a pandas column); rows along the first axis.
        where: the file or split, as the user knows it.
        column: the column name, when ``values`` is one column.
        first_row: the number of the first row in the message (1: rows numbered from 1).

    Example:
        >>> check_finite(np.array([1.0, np.inf, 2.0]), "tx.csv", "amount")
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: tx.csv: column 'amount' holds inf at row 2; every value must be a finite number within float32's range (|x| <= 3.4e+38)
    """
    found = non_finite_problem(np.asarray(values))
    if found is None:
        return
    mask, what = found
    rows = np.flatnonzero(mask) + first_row
    place = f"column {column!r} holds" if column is not None else "holds"
    raise InputError(f"{where}: {place} {what} at {describe_rows(rows)}; every value must be a finite number within float32's range (|x| <= {FLOAT32_MAX:.2g})")


def check_finite_columns(frame: Any, where: str, columns: Iterable[str], first_row: int = 1) -> None:
    """:func:`check_finite` over several numeric columns of a pandas DataFrame, one message for all."""
    problems = []
    for column in columns:
        found = non_finite_problem(np.asarray(frame[column], dtype=np.float64))
        if found is not None:
            mask, what = found
            problems.append(f"column {column!r} holds {what} at {describe_rows(np.flatnonzero(mask) + first_row)}")
    if problems:
        raise InputError(f"{where}: " + "; ".join(problems) + f"; every value must be a finite number within float32's range (|x| <= {FLOAT32_MAX:.2g})")


def check_unique_columns(columns: Sequence[str], where: str) -> None:
    """Refuse a header that names a column twice (pandas would rename the second ``x.1`` and use neither as meant).

    Example:
        >>> check_unique_columns(["amount", "merchant", "amount"], "tx.csv")
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: tx.csv: the header names column 'amount' 2 times (columns 1, 3); every column name must be unique
    """
    counts = Counter(columns)
    repeated = [name for name, n in counts.items() if n > 1]
    if repeated:
        parts = [f"column {name!r} {counts[name]} times (columns {', '.join(str(i + 1) for i, c in enumerate(columns) if c == name)})" for name in repeated]
        raise InputError(f"{where}: the header names " + "; ".join(parts) + "; every column name must be unique")


def _normalised(label: str) -> str:
    return "".join(ch for ch in str(label).lower() if ch.isalnum())


def confusable_labels(labels: Iterable[Any], cutoff: float = 0.8) -> list[tuple[str, str]]:
    """Pairs of labels that look like one class spelt two ways: equal once case, spaces and
    punctuation are dropped, or of difflib similarity ``>= cutoff`` (``covid`` vs ``covid19``).

    Example:
        >>> confusable_labels(["normal", "covid", "COVID-19", "pneumonia"])
        [('COVID-19', 'covid')]
        >>> confusable_labels(["benign", "malignant", "normal", "grade1", "grade2"])
        []
    """
    names = sorted({str(label) for label in labels})
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            na, nb = _normalised(a), _normalised(b)
            if re.search(r"\d", na) and re.search(r"\d", nb) and re.sub(r"\d", "", na) == re.sub(r"\d", "", nb) and na != nb:
                continue  # numbered classes (grade1, grade2) are meant to differ
            if na == nb or difflib.SequenceMatcher(None, na, nb).ratio() >= cutoff or (min(len(na), len(nb)) >= 4 and (na.startswith(nb) or nb.startswith(na))):
                pairs.append((a, b))
    return pairs


def check_labels(
    counts: Mapping[Any, int],
    where: str,
    declared: Sequence[Any] | None = None,
    min_rows: int = 2,
    option: str = "--data.class_names",
    unit: str = "row",
) -> None:
    """Check a label set (label -> number of rows) before it defines the classes of a model.

    With ``declared`` class names, every label must be one of them (the closest is suggested).
    Without, a label spelt like another one or a class with fewer than ``min_rows`` rows is refused:
    list the classes with ``option`` when they are really meant. ``unit`` names what is counted
    (``row``; ``image`` for a folder per class).

    Example:
        >>> check_labels({"normal": 40, "pneumonia": 38, "pnuemonia": 1}, "labels.csv")
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: labels.csv: labels 'pneumonia' (38 rows) and 'pnuemonia' (1 row) look like one class spelt two ways; fix the labels, or list every class with --data.class_names if both are meant
    """
    if declared is not None:
        known = [str(name) for name in declared]
        unknown = [label for label in counts if str(label) not in known]
        if unknown:
            parts = [f"{str(label)!r} ({counts[label]} {unit}{'s' if counts[label] != 1 else ''}){did_you_mean(str(label), known)}" for label in unknown]
            raise InputError(f"{where}: label {', '.join(parts)} is not one of the declared classes {known} ({option})")
        return
    rows = lambda label: f"{counts[label]} {unit}{'s' if counts[label] != 1 else ''}"  # noqa: E731
    by_name = {str(label): label for label in counts}
    for a, b in confusable_labels(by_name):
        first, second = sorted((by_name[a], by_name[b]), key=lambda label: -counts[label])
        raise InputError(
            f"{where}: labels {str(first)!r} ({rows(first)}) and {str(second)!r} ({rows(second)}) look like one class spelt two ways; "
            f"fix the labels, or list every class with {option} if both are meant"
        )
    rare = [label for label in counts if counts[label] < min_rows]
    if rare:
        parts = ", ".join(f"{str(label)!r} ({rows(label)})" for label in rare)
        raise InputError(f"{where}: class {parts} has fewer than {min_rows} {unit}s, too few to train and evaluate; fix the labels, or list every class with {option} if it is meant")


def check_delimiter(header: Sequence[str], where: str, delimiter: str = ",") -> None:
    """Refuse a header read as one column that another delimiter would split (a ``;``- or tab-separated
    export read as comma-separated), naming the delimiter found and the one expected.

    Example:
        >>> check_delimiter(["amount;merchant;is_fraud"], "tx.csv")
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: tx.csv: the header is one column 'amount;merchant;is_fraud': the file looks ';'-separated; expected ','-separated values (re-save it with ',' between fields)
    """
    if len(header) != 1:
        return
    found = [d for d in (";", "\t", "|", ",") if d != delimiter and d in str(header[0])]
    if found:
        raise InputError(
            f"{where}: the header is one column {str(header[0])!r}: the file looks {found[0]!r}-separated; "
            f"expected {delimiter!r}-separated values (re-save it with {delimiter!r} between fields)"
        )


def check_csv_text(path: str | Path, delimiter: str = ",", block_size: int = 1 << 22) -> list[str]:
    """Refuse a text table (CSV/TSV) that is not UTF-8 text or whose rows do not all have one value per
    header column, in one streaming pass over the file, before pandas reads it. Returns the header
    (the first line that is not blank, as the ``csv`` module splits it; ``[]`` for a file of blank lines).

    - **UTF-8** (a byte-order mark is allowed): the first byte that is not UTF-8 is named by line, data
      row, column and byte offset (e.g. a Latin-1 ``é``); it is reported before any other problem.
    - **One value per column**: pandas fills a short row with missing values and trains on it, so a
      file cut short (a truncated copy, an interrupted write) would pass as data with gaps; the first
      line with another number of values is named. Blank lines are skipped, as pandas does. A header
      of one column that another delimiter would split is reported as such (:func:`check_delimiter`).

    Lines without a quote character are counted with numpy, block by block (``block_size`` bytes at a
    time); from the first block holding a quote (or a bare carriage return) on, the ``csv`` module reads
    the rest, so quoted fields with delimiters or line breaks count as one value.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "tx.csv"
        >>> _ = path.write_bytes("amount,merchant\\n1,Caf\\u00e9 Rouge\\n".encode("latin-1"))
        >>> try:
        ...     check_csv_text(path)
        ... except InputError as error:
        ...     print(str(error).removeprefix(f"{path}: "))
        line 2 (data row 1), column 'merchant', byte offset 21 (0xe9) is not UTF-8 text; expected a UTF-8 file (the byte reads as 'é' in Latin-1/cp1252): re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)
        >>> _ = path.write_text("amount,merchant,country\\n1,cafe,FR\\n2,bak")
        >>> try:
        ...     check_csv_text(path)
        ... except InputError as error:
        ...     print(str(error).removeprefix(f"{path}: "))
        line 3 (data row 2) has 2 values but the header has 3 columns ('amount', 'merchant', 'country'); expected one value per column (missing values as empty fields, e.g. '1,,FR'): the file may be cut short (a truncated copy or an interrupted write), or a value holds an unquoted ','
    """
    path = Path(path)
    not_utf8: list[tuple[int, int, bytes]] = []
    with open(path, "rb") as handle:
        chunks = _utf8_lines(handle, block_size, not_utf8)
        header, short = _first_short_row(chunks, delimiter)
        for _ in chunks:  # the rest is still read: a byte that is not UTF-8, anywhere, is reported first
            pass
    if not_utf8:
        raise _not_utf8_error(path, *not_utf8[0], delimiter)
    if short is not None:
        assert header is not None
        check_delimiter(header, str(path), delimiter)
        line, row, count = short
        shown = ", ".join(repr(name) for name in header[:8]) + (", ..." if len(header) > 8 else "")
        raise InputError(
            f"{path}: line {line} (data row {row}) has {count} values but the header has {len(header)} columns ({shown}); "
            f"expected one value per column (missing values as empty fields, e.g. '1,,FR'): the file may be cut short "
            f"(a truncated copy or an interrupted write), or a value holds an unquoted {delimiter!r}"
        )
    return header or []


def _utf8_lines(handle: Any, block_size: int, not_utf8: list[tuple[int, int, bytes]]) -> Iterator[bytes]:
    """Whole lines of a binary file, a block at a time, each checked to be UTF-8; the first byte that is
    not ends them and goes to ``not_utf8`` as ``(byte offset, 1-based line, the bad bytes)``."""
    offset, line, pending, partial = 0, 1, b"", b""  # pending: a character cut by the block's end; partial: a line cut by it
    while True:
        block = handle.read(block_size)
        data = pending + block
        try:
            data.decode("utf-8")
            good = len(data)
        except UnicodeDecodeError as error:
            if not (block and error.reason == "unexpected end of data"):
                start = error.start
                not_utf8.append((offset + len(partial) + start, line + partial.count(b"\n") + data.count(b"\n", 0, start), data[start : error.end]))
                return
            good = error.start
        text, pending = partial + data[:good], data[good:]
        cut = text.rfind(b"\n") + 1 if block else len(text)
        if cut:
            yield text[:cut]
        offset, line, partial = offset + cut, line + text.count(b"\n", 0, cut), text[cut:]
        if not block:
            return


def _first_short_row(chunks: Iterator[bytes], delimiter: str) -> tuple[list[str] | None, tuple[int, int, int] | None]:
    """``(header, (line, data row, number of values) of the first row whose number of values is not the
    header's, or None)`` over :func:`_utf8_lines`' chunks; stops at that row."""
    header: list[str] | None = None
    line = row = 0  # lines and non-blank data rows before the chunk
    first = True
    for chunk in chunks:
        if first:
            chunk, first = chunk.removeprefix(codecs.BOM_UTF8), False
        if b'"' in chunk or (b"\r" in chunk and chunk.count(b"\r") != chunk.count(b"\r\n")):
            return _first_short_row_by_csv(itertools.chain([chunk], chunks), delimiter, header, line, row)
        data = np.frombuffer(chunk, np.uint8)
        ends = np.flatnonzero(data == 10)
        if not chunk.endswith(b"\n"):
            ends = np.append(ends, len(chunk))  # the file's last line, without a line break
        starts = np.concatenate(([0], ends[:-1] + 1))
        separators = np.flatnonzero(data == ord(delimiter))
        values = np.searchsorted(separators, ends) - np.searchsorted(separators, starts) + 1  # separators in [start, end)
        lengths = ends - starts - (data[np.maximum(ends - 1, 0)] == 13)  # a line's length without \r\n
        filled = np.flatnonzero(lengths > 0)
        if header is None and filled.size:
            header = chunk[starts[filled[0]] : starts[filled[0]] + lengths[filled[0]]].decode("utf-8").split(delimiter)
            filled = filled[1:]
        if header is not None:
            short = np.flatnonzero(values[filled] != len(header))
            if short.size:
                at = filled[short[0]]
                return header, (line + int(at) + 1, row + int(short[0]) + 1, int(values[at]))
            row += filled.size
        line += len(ends)
    return header, None


def _first_short_row_by_csv(chunks: Iterator[bytes], delimiter: str, header: list[str] | None, line: int, row: int) -> tuple[list[str] | None, tuple[int, int, int] | None]:
    """:func:`_first_short_row` with the ``csv`` module (quoted fields), from a line boundary outside any quoted field."""
    lines = itertools.chain.from_iterable(io.StringIO(chunk.decode("utf-8"), newline="") for chunk in chunks)  # split as open(newline="") does
    reader = csv.reader(lines, delimiter=delimiter)
    for fields in reader:
        if not fields:
            continue
        if header is None:
            header = fields
            continue
        row += 1
        if len(fields) != len(header):
            return header, (line + reader.line_num, row, len(fields))
    return header, None


#: byte-order marks of the encodings a "not UTF-8" text file most often is (UTF-32's little-endian mark starts
#: with UTF-16's: it is looked for first)
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def byte_order_mark(head: bytes) -> tuple[str, str] | None:
    """``(encoding, the mark as hex bytes)`` when ``head`` starts with a UTF-16/32 byte-order mark.

    >>> byte_order_mark(b"\\xff\\xfe" + "amount".encode("utf-16-le")), byte_order_mark(b"amount")
    (('utf-16', 'FF FE'), None)
    """
    for mark, encoding in BYTE_ORDER_MARKS:
        if head.startswith(mark):
            return encoding, " ".join(f"{b:02X}" for b in mark)
    return None


def _not_utf8_error(path: Path, offset: int, line: int, bad: bytes, delimiter: str) -> InputError:
    """The line, data row, column and byte of the first byte of ``path`` that is not UTF-8; a UTF-16
    or UTF-32 file (its byte-order mark says so) is named as such, with the conversion that fits."""
    with open(path, "rb") as handle:
        head = handle.read(max(offset + 1, 4))
    marked = byte_order_mark(head)
    if marked:
        encoding, shown = marked
        return InputError(
            f"{path} is {encoding.upper()} text (its byte-order mark {shown}, as Excel's \"Unicode text\" writes), not UTF-8; "
            f"expected a UTF-8 file: re-save it as UTF-8 (e.g. iconv -f {encoding} -t utf-8)"
        )
    start = head.rfind(b"\n", 0, offset) + 1
    prefix = head[start:offset].decode("latin-1")
    field = len(next(csv.reader([prefix], delimiter=delimiter), [""])) - (1 if prefix else 0) if prefix else 0
    column = f"field {field + 1}"
    if line > 1:
        header_line = head[: head.find(b"\n")].decode("utf-8-sig", errors="replace").rstrip("\r")
        names = next(csv.reader([header_line], delimiter=delimiter), [])
        if field < len(names):
            column = f"column {names[field]!r}"
    row = f" (data row {line - 1})" if line > 1 else " (the header)"
    shown = " ".join(f"0x{b:02x}" for b in bad)
    return InputError(
        f"{path}: line {line}{row}, {column}, byte offset {offset} ({shown}) is not UTF-8 text; expected a UTF-8 file "
        f"(the byte reads as {bad.decode('cp1252', errors='replace')!r} in Latin-1/cp1252): re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def check_model_label(value: str | None, option: str) -> None:
    """Refuse a model name or version the server cannot show: it goes into HTTP headers
    (``X-Model-Name``/``X-Model-Version``, latin-1 without line breaks) and a metrics label.

    ``None`` (not given) passes; otherwise 1 to 128 printable ASCII characters, no spaces at either end.

    Example:
        >>> check_model_label("fraud-detector", "--model_name")
        >>> check_model_label("v1\\nX-Admin: yes", "--model_version")
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: --model_version 'v1\\nX-Admin: yes': expected 1 to 128 printable ASCII characters (letters, digits, . _ - + : @ /, inner spaces), no control characters or line breaks: it is sent in HTTP headers and metrics labels
    """
    if value is None:
        return
    text = str(value)
    if not (1 <= len(text) <= 128) or text != text.strip() or any(not (0x20 <= ord(ch) <= 0x7E) for ch in text):
        raise InputError(
            f"{option} {text!r}: expected 1 to 128 printable ASCII characters (letters, digits, . _ - + : @ /, inner spaces), "
            "no control characters or line breaks: it is sent in HTTP headers and metrics labels"
        )
