"""``python -m pipelines.monitor REFERENCE WINDOW [--columns a,b] [--psi-threshold 0.2] [--ks-alpha 0.001] [--json OUT]``.

Compares two tables (Parquet ``.parquet``/``.pq`` or CSV ``.csv``) feature by feature with
:func:`pipelines.drift.compare` (PSI and two-sample KS per numeric column), prints one line per
feature and writes the report as JSON with ``--json``.

Exit status: 0 no feature drifted; 3 at least one feature drifted (PSI >= ``--psi-threshold`` or
KS p-value < ``--ks-alpha``); 2 bad input (a missing or unreadable file, an unknown or
non-numeric column, an option out of range); 1 a crash.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from pipelines.drift import KS_ALPHA, PSI_THRESHOLD, compare

EXIT_DRIFT = 3
READERS = {".parquet": pd.read_parquet, ".pq": pd.read_parquet, ".csv": pd.read_csv}


def read_table(path: str) -> pd.DataFrame:
    """A Parquet or CSV file as a frame; ``ValueError`` naming the file otherwise."""
    file = Path(path)
    reader = READERS.get(file.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: expected a {', '.join(READERS)} file")
    if not file.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return reader(file)
    except Exception as error:  # pyarrow, the CSV parser: the file is not what its name says
        raise ValueError(f"{path}: not a readable {file.suffix} table ({type(error).__name__}: {error})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.monitor", description=__doc__.splitlines()[0].strip("`. "))
    parser.add_argument("reference", help="the reference table (e.g. the training data), .parquet or .csv")
    parser.add_argument("window", help="the table to check (e.g. recent requests), .parquet or .csv")
    parser.add_argument("--columns", default=None, help="comma-separated features (default: every numeric column of the reference)")
    parser.add_argument("--psi-threshold", type=float, default=PSI_THRESHOLD, help="a PSI at least this flags drift")
    parser.add_argument("--ks-alpha", type=float, default=KS_ALPHA, help="a KS p-value below this flags drift")
    parser.add_argument("--bins", type=int, default=10, help="quantile bins of the reference for PSI")
    parser.add_argument("--json", default=None, help="write the report here as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.psi_threshold <= 0 or not 0 < args.ks_alpha < 1 or args.bins < 2:
        parser.error(f"--psi-threshold must be > 0, --ks-alpha in (0, 1), --bins >= 2; got {args.psi_threshold}, {args.ks_alpha}, {args.bins}")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    try:
        reference, window = read_table(args.reference), read_table(args.window)
        results = compare(reference, window, columns, args.psi_threshold, args.ks_alpha, args.bins)
    except ValueError as error:
        parser.error(str(error))
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
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return EXIT_DRIFT if drifted else 0


if __name__ == "__main__":
    sys.exit(main())
