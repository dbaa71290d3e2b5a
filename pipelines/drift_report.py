"""The drift report of one ``python -m pipelines.monitor`` run: a folder with ``report.md``, ``drift.png`` and ``drift.json``.

The folder ``REPORTS/monitor-<UTC time>/`` is written under a temporary name and renamed when complete,
so a reader (a dashboard, a cron mail) sees a whole report or none. ``drift.png``: the PSI of every
feature against the thresholds (left), and for the most shifted features the reference's and the
window's cumulative distributions (right), where a shift shows as a gap between the two curves.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.drift import FeatureDrift

SHOWN_FEATURES = 4


def drift_figure(results: list[FeatureDrift], reference: pd.DataFrame, window: pd.DataFrame, psi_threshold: float) -> Any:
    """PSI per feature (bars, drifted ones red) and the CDFs of ``SHOWN_FEATURES`` features: the drifted first, by PSI."""
    from matplotlib.figure import Figure

    shown = sorted(results, key=lambda r: (not r.drifted, -r.psi))[:SHOWN_FEATURES]
    figure = Figure(figsize=(11, 1.2 + 0.9 * max(len(shown), 2) + 0.12 * len(results)))
    grid = figure.add_gridspec(len(shown), 2, width_ratios=[1, 1.3])
    bars = figure.add_subplot(grid[:, 0])
    names = [r.feature for r in results][::-1]
    values = [r.psi for r in results][::-1]
    colors = ["tab:red" if r.drifted else "tab:gray" for r in results][::-1]
    bars.barh(names, values, color=colors)
    bars.axvline(psi_threshold, color="tab:red", linestyle="--", linewidth=1, label=f"PSI threshold {psi_threshold:g}")
    bars.axvline(0.1, color="tab:orange", linestyle=":", linewidth=1, label="0.1 (moderate)")
    bars.set_xlabel("PSI against the reference (red: drifted by PSI or KS)")
    bars.set_title("Population stability index per feature")
    bars.legend(loc="lower right", fontsize=8)
    bars.tick_params(axis="y", labelsize=7 if len(results) > 20 else 9)
    for row, result in enumerate(shown):
        ax = figure.add_subplot(grid[row, 1])
        for frame, label, color in ((reference, "reference (training)", "tab:blue"), (window, "window", "tab:red")):
            values = np.sort(frame[result.feature].to_numpy(dtype=float))
            values = values[np.isfinite(values)]
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=label, color=color, linewidth=1.2)
        ax.set_title(f"{result.feature}: PSI {result.psi:.3f}, KS {result.ks_statistic:.3f} (p {result.ks_pvalue:.2g})", fontsize=9)
        ax.set_ylabel("CDF", fontsize=8)
        ax.tick_params(labelsize=7)
        if row == 0:
            ax.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def markdown(results: list[FeatureDrift], facts: dict[str, Any]) -> str:
    drifted = [r for r in results if r.drifted]
    budget = facts.get("alert_budget")
    lines = [
        f"# Drift report: {facts['verdict']}",
        "",
        f"- reference: `{facts['reference']}` ({facts.get('reference_source') or ('a model' if not results else 'a table')})",
        f"- window: `{facts['window']}` ({facts['window_rows']} rows" + (f", versions {', '.join(facts['versions'])}" if facts.get("versions") else "") + ")",
        f"- thresholds: PSI >= {facts['psi_threshold']:g} or KS p-value < {facts['ks_alpha']:g} / {len(results)} features (Bonferroni) flags a feature",
        f"- written {facts['written_at']}; exit status {facts['exit_code']}",
        "",
        (f"**{len(drifted)} of {len(results)} feature(s) drifted**" + (": " + ", ".join(f"`{r.feature}`" for r in drifted) if drifted else "."))
        if results else "Drift not checked (`--only budget`).",
        "",
    ]
    if budget:
        lines += [f"**{'Alert rate outside the budget' if budget['outside'] else 'Alert rate within the budget'}**: {budget_line(budget)}.", ""]
    if not results:  # --only budget
        return "\n".join(lines) + "\n"
    lines += [
        "![PSI per feature and the distributions of the most shifted features](drift.png)",
        "",
        "| feature | PSI | KS | KS p-value | reference n | window n | window missing | drifted |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in sorted(results, key=lambda r: -r.psi):
        lines.append(f"| `{r.feature}` | {r.psi:.4f} | {r.ks_statistic:.4f} | {r.ks_pvalue:.3g} | {r.reference_count} | {r.window_count} | {r.window_missing} | {'**yes**' if r.drifted else 'no'} |")
    return "\n".join(lines) + "\n"


def budget_line(check: dict[str, Any]) -> str:
    """One line on the window's alert rate against the alert budget (a ``BudgetCheck.as_dict()``)."""
    low, high = check["interval"]
    return (f"{100 * check['live_rate']:.3g} % of {check['rows']} rows alerted (score >= {check['threshold']:.6g}) against a {100 * check['rate']:.3g} % "
            f"budget fitted on {check['fitted_on']}; {100 * (1 - check['alpha']):g} % interval {100 * low:.3g}-{100 * high:.3g} %")  # fmt: skip


def write_report(reports: Path, results: list[FeatureDrift], reference: pd.DataFrame, window: pd.DataFrame, facts: dict[str, Any]) -> Path:
    """Write ``reports/monitor-<UTC time>/`` (complete or absent) and return it."""
    from pipelines.plots import save_figure_atomic

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    final = reports / f"monitor-{stamp}"
    suffix = 1
    while final.exists():
        final, suffix = reports / f"monitor-{stamp}-{suffix}", suffix + 1
    staging = reports / f".{final.name}.{os.getpid()}.partial"
    staging.mkdir(parents=True)
    try:
        if results:  # --only budget: no features compared, no figure
            save_figure_atomic(drift_figure(results, reference, window, facts["psi_threshold"]), staging / "drift.png")
        (staging / "report.md").write_text(markdown(results, facts))
        (staging / "drift.json").write_text(json.dumps({**facts, "features": [r.as_dict() for r in results]}, indent=2) + "\n")
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
