"""``python -m pipelines.monitor REFERENCE WINDOW [--columns a,b] [--psi-threshold 0.2] [--ks-alpha 0.001] [--json OUT]``.

Compares two tables (Parquet ``.parquet``/``.pq`` or CSV ``.csv``) feature by feature with
:func:`pipelines.drift.compare` (PSI and two-sample KS per numeric column), prints one line per
feature and writes the report as JSON with ``--json``.

Exit status: 0 no feature drifted; 3 at least one feature drifted (PSI >= ``--psi-threshold`` or
KS p-value < ``--ks-alpha``); 2 bad input (a missing, empty or unreadable file, a header with no
rows or a repeated column, a CSV that is not UTF-8, a missing column, a value that is not a number
or is inf, fewer than 2 values, an unknown option or one out of range), refused with one paragraph
naming the file, column and rows before anything is written; 1 a crash. Missing values (NaN, empty
cells) are left out of the statistics and counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

from pipelines.drift import KS_ALPHA, PSI_THRESHOLD, compare
from pipelines.errors import EXIT_BAD_INPUT, InputError, did_you_mean, paragraph
from pipelines.validation import check_delimiter, check_unique_columns, check_utf8

EXIT_DRIFT = 3
SUFFIXES = (".parquet", ".pq", ".csv")


def read_table(path: str) -> pd.DataFrame:
    """A Parquet or CSV file as a frame; :class:`InputError` naming the file (and the line) otherwise.

    Refused: another extension, a missing file, an empty file, a header and no rows, a header naming
    a column twice, a CSV that is not UTF-8 text, a file its reader cannot parse.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: expected a {', '.join(SUFFIXES)} file")
    if not file.is_file():
        raise InputError(f"{path}: no such file")
    if file.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes); expected a header and one row per request or record")
    try:
        if suffix == ".csv":
            check_utf8(file)
            frame = pd.read_csv(file)
            header = list(pd.read_csv(file, header=None, nrows=1, dtype=str).iloc[0].astype(str))
        else:
            frame = pd.read_parquet(file)
            header = [str(c) for c in frame.columns]
    except InputError:
        raise
    except Exception as error:  # pyarrow, the CSV parser: the file is not what its name says
        raise InputError(f"{path}: not a readable {suffix} table ({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''})") from None
    if suffix == ".csv":
        check_delimiter(header, path)
    check_unique_columns(header, path)
    if len(frame) == 0:
        raise InputError(f"{path}: the table has no data rows (columns {header}); expected one row per request or record")
    return frame


class _Parser(argparse.ArgumentParser):
    """Usage errors as one paragraph with a "did you mean" (no usage dump), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        options = [o for action in self._actions for o in action.option_strings]
        words = [w.split("=")[0] for w in message.replace(",", " ").split() if w.startswith("--")]
        hints = "".join(did_you_mean(w, options) for w in words if w not in options)
        print(paragraph(f"{message}{hints}; see python -m pipelines.monitor --help"), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipelines.monitor", description=__doc__.splitlines()[0].strip("`. "))
    parser.add_argument("reference", help="the reference table (e.g. the training data), .parquet or .csv")
    parser.add_argument("window", help="the table to check (e.g. recent requests), .parquet or .csv")
    parser.add_argument("--columns", default=None, help="comma-separated features (default: every numeric column of the reference)")
    parser.add_argument("--psi-threshold", type=float, default=PSI_THRESHOLD, help="a PSI at least this flags drift")
    parser.add_argument("--ks-alpha", type=float, default=KS_ALPHA, help="a KS p-value below this flags drift")
    parser.add_argument("--bins", type=int, default=10, help="quantile bins of the reference for PSI")
    parser.add_argument("--json", default=None, help="write the report here as JSON (written whole, or not at all)")
    return parser


def write_json(path: Path, report: dict) -> None:
    """The report, complete or absent: written to a partial file, then renamed."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.psi_threshold > 0 or not 0 < args.ks_alpha < 1 or args.bins < 2:
        parser.error(f"--psi-threshold must be > 0, --ks-alpha in (0, 1), --bins >= 2; got {args.psi_threshold}, {args.ks_alpha}, {args.bins}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: the folder {Path(args.json).resolve().parent} does not exist")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    if args.columns is not None and not columns:
        parser.error(f"--columns {args.columns!r} names no column; expected comma-separated column names")
    try:
        reference, window = read_table(args.reference), read_table(args.window)
        results = compare(reference, window, columns, args.psi_threshold, args.ks_alpha, args.bins, names=(args.reference, args.window))
    except ValueError as error:  # InputError and the checks' ValueErrors: bad input, nothing written
        print(paragraph(str(error)), file=sys.stderr)
        return EXIT_BAD_INPUT
    for r in results:
        print(f"{'DRIFT' if r.drifted else 'ok   '} {r.feature}: psi {r.psi:.4f}  ks {r.ks_statistic:.4f} (p {r.ks_pvalue:.3g})  "
              f"n {r.reference_count}/{r.window_count}  missing {r.reference_missing}/{r.window_missing}")  # fmt: skip
    drifted = [r.feature for r in results if r.drifted]
    print(f"[pipelines] {len(drifted)} of {len(results)} feature(s) drifted" + (f": {', '.join(drifted)}" if drifted else ""))
    if args.json:
        report = {
            "reference": args.reference, "window": args.window, "psi_threshold": args.psi_threshold, "ks_alpha": args.ks_alpha,
            "drifted": drifted, "features": [r.as_dict() for r in results],
        }  # fmt: skip
        write_json(Path(args.json), report)
    return EXIT_DRIFT if drifted else 0


if __name__ == "__main__":
    sys.exit(main())
