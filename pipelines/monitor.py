"""``python -m pipelines.monitor REFERENCE WINDOW [--columns a,b] [--psi_threshold 0.2] [--ks_alpha 0.001] [--json OUT] [--report DIR] [--recalibrate_budget OUT]``.

Compares a window of data with a reference feature by feature with :func:`pipelines.drift.compare`
(PSI and two-sample KS per numeric column), prints one line per feature, writes the results as JSON
with ``--json`` and a report folder (Markdown, PNG, JSON: :mod:`pipelines.drift_report`) with ``--report``.

REFERENCE: a table (Parquet ``.parquet``/``.pq`` or CSV ``.csv``, e.g. the training data), or the
reference statistics fitted on the training split and saved in a checkpoint (``.ckpt``) or an
exported bundle folder (:mod:`pipelines.reference`): no training files needed.
WINDOW: a table, or the server's request log (``.jsonl``, with its rotated files, or ``.parquet``, its segments:
:mod:`pipelines.request_log`); ``--last N`` keeps its newest N records, ``--model_version V`` those
one model version answered.

Alert budget (a model with one, e.g. finance's ``target_alert_rate``: :mod:`pipelines.monitor_budget`):
when REFERENCE is such a checkpoint or bundle and the window holds the model's scores (the request
log's ``output.score``, a table's ``score`` column such as ``predict``'s output), the window's alert
rate (``score >= budget_threshold``) is reported against the budget with a two-sided binomial
interval (``--budget_alpha``); a rate outside it is flagged like drift (exit 3). ``--only budget``
checks the budget alone (a window of scores without the features), ``--only drift`` drift alone.
``--recalibrate_budget OUT`` refits the budget threshold on the window's scores (the ``rate`` quantile
of recent traffic the same model scored; ``--model_version V`` picks its records in a request log)
and writes the checkpoint or bundle with it to OUT, a new path (complete or absent; the model is
not retrained and the original is never touched); it checks nothing else and exits 0 when written.

Exit status: 0 no feature drifted and the alert rate (when checked) within its interval; 3 at least
one feature drifted (PSI >= ``--psi_threshold`` or KS p-value < ``--ks_alpha`` / number of features; for a
reference with a sample of whole rows, generated images: their MMD p-value < ``--mmd_alpha``,
:mod:`pipelines.monitor_mmd`) or the alert rate is outside its interval; 2 bad input (a missing, empty or unreadable file, a bundle or checkpoint without reference statistics, a header with no
rows or a repeated column, a CSV that is not UTF-8, a missing column, a value that is not a number
or is inf, fewer than 2 values, a window in other units than the reference such as raw amounts against a
model's preprocessed features (:mod:`pipelines.drift_units`), an unknown option or one out of range), refused with one paragraph
naming the file, column and rows before anything is written; 1 a crash. Missing values (NaN, empty
cells) are left out of the statistics and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from pipelines.drift import KS_ALPHA, PSI_THRESHOLD, compare
from pipelines.errors import EXIT_BAD_INPUT, InputError, did_you_mean, paragraph
from pipelines.option_spelling import OptionParser
from pipelines.stops import sigterm_as_exit
from pipelines.csv_text import check_csv_text, check_delimiter
from pipelines.validation import check_unique_columns
from pipelines.reference import load_reference, reference_frame, units_note
from pipelines.request_log import read_log, segment_files, version_problem
from pipelines.files import destination_problem, report_destination_problem, write_json_atomic
from pipelines.monitor_mmd import MMD_ALPHA, sample_test
from pipelines.monitor_wandb import log_to_wandb, monitor_metrics
from pipelines.monitor_budget import ALPHA as BUDGET_ALPHA, Budget, BudgetCheck, check_budget, check_versions, read_budget, recalibrate, window_scores

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
    parquet_log = path.endswith(".parquet") and not Path(path).exists() and bool(segment_files(path))  # --request_log FILE.parquet
    if not path.endswith(".jsonl") and not parquet_log:
        return read_table(path), ""
    frame, skipped = read_log(path)
    if version is not None:
        if version not in set(frame["version"]):
            raise ValueError(f"{path}: no records of model version {version!r} (versions: {sorted(set(frame['version'].astype(str)))})")
        frame = frame[frame["version"] == version]
    if last is not None:
        frame = frame.tail(last)
    return frame.reset_index(drop=True), f"request log, {skipped} cut line(s) skipped" if skipped else "request log"


def check_window_versions(window: pd.DataFrame, reference: str, chosen: str | None, name: str) -> None:
    """A request log's features are in the preprocessing units of the model that answered them, so drift against a
    reference is measured only on the records of one model: the reference's (a bundle names its served version).
    Refused (``InputError``): several versions without ``--model_version``, or a bundle's log of another version."""
    served = None
    if "version" in window.columns and Path(reference).is_dir() and (Path(reference) / "metadata.json").is_file():
        from pipelines.serving_server import model_identity

        served = model_identity(json.loads((Path(reference) / "metadata.json").read_text()))["version"]
    problem = version_problem(window, served, chosen)
    if problem is None:
        return
    kind, versions = problem
    if kind == "several":
        raise InputError(f"{name}: the window holds the records of several model versions {versions}, each in its own model's feature "
                         f"units; pick those of the model {reference} is with --model_version")  # fmt: skip
    raise InputError(
        f"{name}: its records were answered by model version {versions[0]!r}, not by {reference} (version {served!r}); their features "
        "are in that model's preprocessing units, so a drift test against this reference would measure the change of model, not of "
        "the data. Compare them with the reference of the model that answered them, or pick this model's records with --model_version"
    )


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
    parser.add_argument("--mmd_alpha", type=float, default=MMD_ALPHA, help="a reference with a sample (images): an MMD p-value below this flags drift")
    parser.add_argument("--only", choices=["drift", "budget"], default=None, help="check only drift, or only the alert rate against the model's alert budget")
    parser.add_argument("--budget_alpha", type=float, default=BUDGET_ALPHA, help="an alert rate outside the (1 - alpha) binomial interval of the budget is flagged")
    parser.add_argument("--wandb", action="store_true", help="also log the check's numbers to W&B (offline unless a key is present; pipelines.monitor_wandb)")
    parser.add_argument("--recalibrate_budget", default=None, metavar="OUT", help="write the model (checkpoint or bundle) with its budget threshold refitted on the window's scores to OUT (a new path)")
    return parser


def check_alert_budget(args: argparse.Namespace, window: pd.DataFrame) -> tuple[Budget | None, BudgetCheck | None]:
    """The model's alert budget and the window's alert rate against it (``None``s where there is none or no scores;
    ``--only budget`` then refuses)."""
    model = Path(args.reference).is_dir() or args.reference.endswith(".ckpt")
    budget = read_budget(args.reference) if model else None
    found = window_scores(window, args.window) if budget else None
    if args.only == "budget" and found is None:
        raise InputError(f"--only budget: {args.reference if budget is None else args.window} has no "
                         f"{'alert budget (a finance checkpoint or bundle has one)' if budget is None else 'score column (output.score in a request log, score in a table)'}")  # fmt: skip
    if found is None:
        return budget, None
    try:
        check_versions(budget, window, args.window, args.model_version)
    except InputError as error:
        if args.only == "budget":
            raise
        print(f"[pipelines] alert rate not checked: {error}")  # drift is about the data, whichever model answered
        return budget, None
    scores, missing = found
    return budget, check_budget(scores, budget, alpha=args.budget_alpha, missing=missing)


def model_domain(reference: str) -> str:
    """The domain of a bundle or checkpoint reference (its W&B project); ``monitor`` for a table or an unknown model."""
    import json

    from pipelines.checkpoints import checkpoint_domain, read_checkpoint

    if Path(reference).is_dir():
        return str(json.loads((Path(reference) / "metadata.json").read_text()).get("domain") or "monitor")
    return (checkpoint_domain(read_checkpoint(reference)) or "monitor") if reference.endswith(".ckpt") else "monitor"


def recalibrate_budget(args: argparse.Namespace, window: pd.DataFrame, note: str) -> int:
    budget, before = check_alert_budget(argparse.Namespace(**{**vars(args), "only": "budget"}), window)
    print(f"[pipelines] before: {before.line()}")
    scores, _ = window_scores(window, args.window)
    out, record = recalibrate(budget, scores, args.recalibrate_budget, args.window + (f" ({note})" if note else ""))
    after = check_budget(scores, budget, record["threshold"], args.budget_alpha, fitted_rows=len(scores), fitted_on="this window")
    print(f"[pipelines] after:  {after.line()}")
    print(f"[pipelines] recalibrated {budget.kind} written to {out} (budget threshold {budget.threshold:.6g} -> {record['threshold']:.6g}; {budget.path} unchanged)")
    return 0


@sigterm_as_exit("monitor")  # a stopped monitor leaves no partial report folder (its clean-up runs), exit 143
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.last is not None and args.last < 2:
        parser.error(f"--last must be >= 2, got {args.last}")
    if not args.psi_threshold > 0 or not 0 < args.ks_alpha < 1 or args.bins < 2:
        parser.error(f"--psi_threshold must be > 0, --ks_alpha in (0, 1), --bins >= 2; got {args.psi_threshold}, {args.ks_alpha}, {args.bins}")
    if not 0 < args.budget_alpha < 1 or not 0 < args.mmd_alpha < 1:
        parser.error(f"--budget_alpha and --mmd_alpha must be in (0, 1); got {args.budget_alpha}, {args.mmd_alpha}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: the folder {Path(args.json).resolve().parent} does not exist")
    problems = [
        report_destination_problem(Path(args.json), "--json", "verdict", (args.reference, args.window)) if args.json else None,
        destination_problem(Path(args.report), "--report", folder=True) if args.report else None,
    ]  # fmt: skip
    for problem in filter(None, problems):
        parser.error(problem)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    if args.columns is not None and not columns:
        parser.error(f"--columns {args.columns!r} names no column; expected comma-separated column names")
    try:
        window, note = read_window(args.window, args.last, args.model_version)
        if args.recalibrate_budget:
            return recalibrate_budget(args, window, note)
        results, reference, stats, embedding = [], None, None, None
        if args.only != "budget":
            check_window_versions(window, args.reference, args.model_version, args.window)
            reference, stats = read_reference(args.reference)
            results = compare(reference, window, columns, args.psi_threshold, args.ks_alpha, args.bins, names=(args.reference, args.window), units_note=units_note(stats))
            results = with_reference_counts(results, stats)
            embedding = sample_test(stats, window)
        budget, alert_rate = check_alert_budget(args, window) if args.only != "drift" else (None, None)
    except ValueError as error:  # InputError and the checks' ValueErrors: bad input, nothing written
        print(paragraph(str(error)), file=sys.stderr)
        return EXIT_BAD_INPUT
    for r in results:
        print(f"{'DRIFT' if r.drifted else 'ok   '} {r.feature}: psi {r.psi:.4f} (p {r.psi_pvalue:.3g})  ks {r.ks_statistic:.4f} (p {r.ks_pvalue:.3g})  "
              f"n {r.reference_count}/{r.window_count}  missing {r.reference_missing}/{r.window_missing}")  # fmt: skip
    small = [r.feature for r in results if min(r.reference_count, r.window_count) < 20 * args.bins]
    if small:
        print(f"[pipelines] note: fewer than {20 * args.bins} values on one side for {', '.join(small)}: PSI is noisy there "
              f"(about {args.bins - 1} / n of it is sampling noise), so a PSI over the threshold counts only when its p-value "
              f"says noise cannot explain it; KS accounts for the sizes too")  # fmt: skip
    drifted = [r.feature for r in results if r.drifted]
    if embedding is not None:
        moved = embedding.pvalue < args.mmd_alpha
        drifted += ["embedding (MMD)"] if moved else []
        print(f"{'DRIFT' if moved else 'ok   '} embedding (MMD over {embedding.columns} columns, {embedding.reference_rows}/{embedding.window_rows} rows): "
              f"mmd2 {embedding.mmd2:.4g} (p {embedding.pvalue:.3g}, {embedding.permutations} permutations)")  # fmt: skip
    if args.only != "budget":
        print(f"[pipelines] {len(drifted)} of {len(results)} feature(s) drifted" + (f": {', '.join(drifted)}" if drifted else ""))
    if alert_rate is not None:
        print(f"[pipelines] {'BUDGET' if alert_rate.outside else 'ok    '} {alert_rate.line()}")
    elif budget is not None:
        print(f"[pipelines] the window has no score column: its alert rate was not checked against the {100 * budget.rate:g} % alert budget")
    outside = alert_rate is not None and alert_rate.outside
    code = EXIT_DRIFT if drifted or outside else 0
    verdict = " and ".join([*(["drift"] if drifted else []), *(["alert rate outside the budget"] if outside else [])]) or ("no drift" if args.only != "budget" else "alert rate within the budget")
    facts = {
        "reference": args.reference, "reference_source": f"reference statistics of {stats['source']}" if stats else None, "window": args.window + (f" ({note})" if note else ""), "window_rows": len(window),
        "versions": sorted(set(window["version"].astype(str))) if "version" in window else [], "psi_threshold": args.psi_threshold,
        "ks_alpha": args.ks_alpha, "drifted": drifted, "mmd": embedding.as_dict() if embedding else None, "alert_budget": alert_rate.as_dict() if alert_rate else None, "verdict": verdict, "exit_code": code,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    facts["logged"] = monitor_metrics(results, alert_rate, window)
    if args.wandb:
        print(f"[pipelines] {log_to_wandb(facts['logged'], model_domain(args.reference), facts)}")
    if args.json:
        write_json_atomic(Path(args.json), {**facts, "features": [r.as_dict() for r in results]})
    if args.report:
        from pipelines.drift_report import write_report

        folder = write_report(Path(args.report), results, reference, window, facts)
        print(f"[pipelines] report: {folder / 'report.md'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
