"""``python -m pipelines.retrain DOMAIN --when drift --drift_window LOG [...] [retrain options]``: retrain only when the data moved.

Before anything else of the attempt, the window (the server's request log ``.jsonl`` or a table,
``--drift_last N`` newest records) is compared with the reference statistics saved in the
**champion's** checkpoint in the registry (:mod:`pipelines.reference`; the training files are not
needed), as ``python -m pipelines.monitor`` does. No feature drifted: exit ``4`` (nothing new,
nothing trained). Drift: the attempt runs as without ``--when drift`` and exits with its own code.
No champion yet: the attempt runs (there is nothing to compare with). Too few records to judge (an empty request
log, fewer than 2 records of the champion, or only earlier champions' records the night after a promotion):
exit ``4``, nothing trained, with a line saying so (waiting fixes it). A champion without reference
statistics, an unreadable window, or a window in other units than the reference (raw data against the
model's preprocessed features: :mod:`pipelines.drift_units`): exit ``2`` naming it. ``--when always`` (the default) skips the check.

A scheduler that wants the decision without retraining runs ``python -m pipelines.monitor`` and
branches on its exit code (0 no drift, 3 drift).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.drift import KS_ALPHA, PSI_THRESHOLD
from pipelines.option_spelling import OneLineParser


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m pipelines.retrain", add_help=False, allow_abbrev=False)  # never take a runner option for one of these
    parser.add_argument("--when", choices=["always", "drift"], default="always")
    parser.add_argument("--drift_window", default=None)
    parser.add_argument("--drift_last", type=int, default=None)
    parser.add_argument("--drift_psi_threshold", type=float, default=PSI_THRESHOLD)
    parser.add_argument("--drift_ks_alpha", type=float, default=KS_ALPHA)
    parser.add_argument("--drift_report", default=None)
    return parser


def gate(argv: list[str]) -> tuple[int | None, list[str]]:
    """``(exit code, argv)``: an exit code when the attempt must not run (no drift: 4; bad gate options: 2), else
    ``None`` and ``argv`` without the gate's options."""
    from pipelines.retrain_steps import ExitCode

    options, rest = _parser().parse_known_args(argv)
    if options.when == "always":
        if options.drift_window:
            print("[retrain] error: --drift_window goes with --when drift", file=sys.stderr)
            return ExitCode.USAGE, rest
        return None, rest
    if options.drift_last is not None and options.drift_last < 2 or options.drift_psi_threshold <= 0 or not 0 < options.drift_ks_alpha < 1:
        print("[retrain] error: --drift_last must be >= 2, --drift_psi_threshold > 0, --drift_ks_alpha in (0, 1)", file=sys.stderr)
        return ExitCode.USAGE, rest
    if not options.drift_window:
        print("[retrain] error: --when drift needs --drift_window (the server's request log or a table of recent data)", file=sys.stderr)
        return ExitCode.USAGE, rest
    try:
        drifted = check_drift(rest[0] if rest else "", _registry_of(rest), options)
    except TooFewRecords as error:  # a quiet night, or the first one after a promotion: waiting fixes it, the job is right
        print(f"[retrain] --when drift: {error}: nothing to judge, nothing trained (exit 4)")
        return ExitCode.NOTHING_NEW, rest
    except ValueError as error:
        print(f"[retrain] error: --when drift: {error}", file=sys.stderr)
        return ExitCode.USAGE, rest
    if drifted is None:
        print("[retrain] --when drift: no champion yet, nothing to compare with: training the first model")
        return None, rest
    if not drifted:
        print("[retrain] --when drift: no feature drifted against the champion's training data: nothing trained (exit 4)")
        return ExitCode.NOTHING_NEW, rest
    print(f"[retrain] --when drift: drift in {', '.join(drifted)}: retraining")
    return None, rest


def _registry_of(argv: list[str]) -> Path:
    from pipelines.model_registry import default_registry

    found = None
    for i, arg in enumerate(argv):
        if arg == "--registry" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--registry="):
            found = arg.split("=", 1)[1]
    return Path(found) if found else default_registry()


class TooFewRecords(Exception):
    """The window holds fewer than two records the champion answered, in a state that time fixes: an empty
    request log, or one whose records all come from the registry's other versions (the night after a promotion)."""


def champion_records(window: Any, version: str, name: str, earlier: tuple[str, ...] = ()) -> Any:
    """The records of a request log that the champion answered: each model logs features in its own preprocessing
    units, so records of other versions (before a promotion) are left out, and a log with none of the champion's is
    refused rather than compared (its drift would be the change of model, not of the data). A table without versions is kept."""
    from pipelines.request_log import window_versions

    versions = window_versions(window)
    if not versions:
        return window
    mine = window[window["version"].astype(str) == version]
    if not len(mine) and set(versions) <= set(earlier):
        raise TooFewRecords(f"{name}: no records answered by champion {version} yet (only by this registry's other versions {versions}, each in its own units)")
    if not len(mine):
        raise ValueError(f"{name}: no records answered by champion {version} (versions in the window: {versions}); their features are in "
                         f"another model's units. Serve the champion with python -m pipelines.serve DOMAIN --registry (its records carry "
                         f"{version!r}), or give a table of recent data")  # fmt: skip
    if len(mine) < len(window):
        print(f"[retrain] drift window: {len(mine)} of {len(window)} records answered by champion {version}; the others ({[v for v in versions if v != version]}) are left out")
    return mine.reset_index(drop=True)


def check_drift(domain: str, root: Path, options: argparse.Namespace) -> list[str] | None:
    """The drifted features (empty: none), or ``None`` when the registry has no champion; ``ValueError`` naming a problem."""
    from pipelines.drift import compare
    from pipelines.model_registry import ModelRegistry
    from pipelines.monitor import read_window
    from pipelines.reference import check, find_in_checkpoint, reference_frame, units_note

    from pipelines.request_log import EmptyRequestLog

    try:
        window, _ = read_window(options.drift_window, None, None)  # checked first: a missing window is bad input, champion or not
    except EmptyRequestLog as empty:
        window, quiet = None, empty
    registry = ModelRegistry(root, domain)
    if not registry.path.is_dir() or registry.champion() is None:
        return None
    if window is None:
        raise TooFewRecords(str(quiet))
    version = registry.champion()
    stats = find_in_checkpoint(registry.load_checkpoint(version))
    if stats is None:
        raise ValueError(f"champion {version} in {registry.path} holds no reference statistics (trained before they were saved); retrain without --when drift once")
    check(stats, f"champion {version}")
    window = champion_records(window, version, options.drift_window, tuple(v for v in registry.versions() if v != version))
    if options.drift_last is not None and "version" in window.columns:  # a request log: its newest records of the champion
        window = window.tail(options.drift_last).reset_index(drop=True)
    if "version" in window.columns and len(window) < 2:
        raise TooFewRecords(f"{options.drift_window}: {len(window)} record(s) answered by champion {version}; drift needs at least 2")
    results = compare(reference_frame(stats), window, None, options.drift_psi_threshold, options.drift_ks_alpha,
                      names=(f"champion {version}", options.drift_window), units_note=units_note(stats))  # fmt: skip
    for r in results:
        print(f"[retrain] drift {'DRIFT' if r.drifted else 'ok   '} {r.feature}: psi {r.psi:.4f} ks {r.ks_statistic:.4f} (p {r.ks_pvalue:.3g})")
    if options.drift_report:
        from pipelines.drift_report import write_report

        drifted = [r.feature for r in results if r.drifted]
        facts = {"reference": f"{registry.path} champion {version}", "reference_source": stats["source"], "window": options.drift_window,
                 "window_rows": len(window), "psi_threshold": options.drift_psi_threshold, "ks_alpha": options.drift_ks_alpha,
                 "drifted": drifted, "verdict": "drift" if drifted else "no drift", "exit_code": "retrain" if drifted else 4,
                 "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        write_report(Path(options.drift_report), results, reference_frame(stats), window, facts)
    return [r.feature for r in results if r.drifted]
