"""Text tables (CSV/TSV) checked in one pass before pandas reads them (the validation layer's text-file rules,
:mod:`pipelines.validation`).

- :func:`check_csv_text`: UTF-8 (a byte-order mark is allowed; the first other byte is named by line, data row,
  column and byte, e.g. a Latin-1 ``é``), and one value per header column on every row (a file cut short is refused).
- :func:`check_delimiter`: a header read as one column that another delimiter would split is refused, naming both.
- :func:`byte_order_mark`: a UTF-16/32 byte-order mark, named (such a file is not UTF-8 text).
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import InputError

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
