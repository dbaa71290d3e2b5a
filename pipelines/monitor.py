"""``python -m pipelines.monitor REFERENCE WINDOW [--columns a,b] [--psi_threshold 0.2] [--ks_alpha 0.001] [--json OUT] [--report DIR]``.

Compares a window of data with a reference feature by feature with :func:`pipelines.drift.compare`
(PSI and two-sample KS per numeric column), prints one line per feature, writes the results as JSON
with ``--json`` and a report folder (Markdown, PNG, JSON: :mod:`pipelines.drift_report`) with ``--report``.

REFERENCE: a table (Parquet ``.parquet``/``.pq`` or CSV ``.csv``, e.g. the training data), or the
reference statistics fitted on the training split and saved in a checkpoint (``.ckpt``) or an
exported bundle folder (:mod:`pipelines.reference`): no training files needed.
WINDOW: a table, or the server's request log (``.jsonl``, with its rotated files:
:mod:`pipelines.request_log`); ``--last N`` keeps its newest N records, ``--model_version V`` those
one model version answered.

Exit status: 0 no feature drifted; 3 at least one feature drifted (PSI >= ``--psi_threshold`` or
KS p-value < ``--ks_alpha`` / number of features); 2 bad input (a missing, empty or unreadable file, a bundle or checkpoint without reference statistics, a header with no
rows or a repeated column, a CSV that is not UTF-8, a missing column, a value that is not a number
or is inf, fewer than 2 values, an unknown option or one out of range), refused with one paragraph
naming the file, column and rows before anything is written; 1 a crash. Missing values (NaN, empty
cells) are left out of the statistics and counted.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from pipelines.drift import KS_ALPHA, PSI_THRESHOLD, compare
from pipelines.errors import EXIT_BAD_INPUT, InputError, did_you_mean, paragraph
from pipelines.option_spelling import OptionParser
from pipelines.validation import check_csv_text, check_delimiter, check_unique_columns
from pipelines.reference import load_reference, reference_frame
from pipelines.request_log import read_log
from pipelines.files import write_json_atomic

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
            check_csv_text(file)  # UTF-8 and one value per column, in one pass
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


class _Parser(OptionParser):
    """Usage errors as one paragraph with a "did you mean" (no usage dump), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        options = [o for action in self._actions for o in action.option_strings]
        words = [w.split("=")[0] for w in message.replace(",", " ").split() if w.startswith("--")]
        hints = "".join(did_you_mean(w, options) for w in words if w not in options)
        print(paragraph(f"{message}{hints}; see python -m pipelines.monitor --help"), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def read_reference(path: str) -> tuple[pd.DataFrame, dict | None]:
    """A reference table, or the pseudo-sample of the reference statistics a bundle or checkpoint holds (and those statistics)."""
    if Path(path).is_dir() or path.endswith(".ckpt"):
        stats = load_reference(path)
        return reference_frame(stats), stats
    return read_table(path), None


def with_reference_counts(results: list, stats: dict | None) -> list:
    """Results whose reference counts are the training split's (not the pseudo-sample's) when the reference is statistics."""
    if stats is None:
        return results
    return [replace(r, reference_count=stats["features"][r.feature]["count"], reference_missing=stats["features"][r.feature]["missing"]) for r in results]


def read_window(path: str, last: int | None, version: str | None) -> tuple[pd.DataFrame, str]:
    """The window table or request log (its newest ``last`` records of model ``version``) and a note on what was read."""
    if not path.endswith(".jsonl"):
        return read_table(path), ""
    frame, skipped = read_log(path)
    if version is not None:
        if version not in set(frame["version"]):
            raise ValueError(f"{path}: no records of model version {version!r} (versions: {sorted(set(frame['version'].astype(str)))})")
        frame = frame[frame["version"] == version]
    if last is not None:
        frame = frame.tail(last)
    return frame.reset_index(drop=True), f"request log, {skipped} cut line(s) skipped" if skipped else "request log"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipelines.monitor", description=__doc__.splitlines()[0].strip("`. "))
    parser.add_argument("reference", help="the reference: a .parquet/.csv table, or a bundle folder or .ckpt holding reference statistics")
    parser.add_argument("window", help="the data to check: a .parquet/.csv table or the server's request log (.jsonl)")
    parser.add_argument("--last", type=int, default=None, help="request log: only its newest N records")
    parser.add_argument("--model_version", default=None, help="request log: only the records this model version answered")
    parser.add_argument("--report", default=None, help="write a report folder (report.md, drift.png, drift.json) under this folder")
    parser.add_argument("--columns", default=None, help="comma-separated features (default: every numeric column of the reference)")
    parser.add_argument("--psi_threshold", type=float, default=PSI_THRESHOLD, help="a PSI at least this flags drift")
    parser.add_argument("--ks_alpha", type=float, default=KS_ALPHA, help="a KS p-value below this divided by the number of features flags drift (Bonferroni)")
    parser.add_argument("--bins", type=int, default=10, help="quantile bins of the reference for PSI")
    parser.add_argument("--json", default=None, help="write the report here as JSON (written whole, or not at all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.last is not None and args.last < 2:
        parser.error(f"--last must be >= 2, got {args.last}")
    if not args.psi_threshold > 0 or not 0 < args.ks_alpha < 1 or args.bins < 2:
        parser.error(f"--psi_threshold must be > 0, --ks_alpha in (0, 1), --bins >= 2; got {args.psi_threshold}, {args.ks_alpha}, {args.bins}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: the folder {Path(args.json).resolve().parent} does not exist")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    if args.columns is not None and not columns:
        parser.error(f"--columns {args.columns!r} names no column; expected comma-separated column names")
    try:
        (reference, stats), (window, note) = read_reference(args.reference), read_window(args.window, args.last, args.model_version)
        results = compare(reference, window, columns, args.psi_threshold, args.ks_alpha, args.bins, names=(args.reference, args.window))
        results = with_reference_counts(results, stats)
    except ValueError as error:  # InputError and the checks' ValueErrors: bad input, nothing written
        print(paragraph(str(error)), file=sys.stderr)
        return EXIT_BAD_INPUT
    for r in results:
        print(f"{'DRIFT' if r.drifted else 'ok   '} {r.feature}: psi {r.psi:.4f}  ks {r.ks_statistic:.4f} (p {r.ks_pvalue:.3g})  "
              f"n {r.reference_count}/{r.window_count}  missing {r.reference_missing}/{r.window_missing}")  # fmt: skip
    small = [r.feature for r in results if min(r.reference_count, r.window_count) < 20 * args.bins]
    if small:
        print(f"[pipelines] warning: fewer than {20 * args.bins} values on one side for {', '.join(small)}: PSI is noisy there "
              f"(about {args.bins - 1} / n of it is sampling noise); KS accounts for the sizes")  # fmt: skip
    drifted = [r.feature for r in results if r.drifted]
    print(f"[pipelines] {len(drifted)} of {len(results)} feature(s) drifted" + (f": {', '.join(drifted)}" if drifted else ""))
    code = EXIT_DRIFT if drifted else 0
    facts = {
        "reference": args.reference, "reference_source": f"reference statistics of {stats['source']}" if stats else None, "window": args.window + (f" ({note})" if note else ""), "window_rows": len(window),
        "versions": sorted(set(window["version"].astype(str))) if "version" in window else [], "psi_threshold": args.psi_threshold,
        "ks_alpha": args.ks_alpha, "drifted": drifted, "verdict": "drift" if drifted else "no drift", "exit_code": code,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    if args.json:
        write_json_atomic(Path(args.json), {**facts, "features": [r.as_dict() for r in results]})
    if args.report:
        from pipelines.drift_report import write_report

        folder = write_report(Path(args.report), results, reference, window, facts)
        print(f"[pipelines] report: {folder / 'report.md'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
