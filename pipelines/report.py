"""``report.html`` in every run folder: what was trained, on what, how well, and where it fails.

One builder for every domain (:func:`build_report`), in the spirit of a model card: the data (split
sizes, class balance, the content fingerprint of the data files), the metrics with their bootstrap
intervals, calibration and the operating point, limits (classes with few examples, wide intervals,
the operating point), every plot of the run (embedded, so the file stands alone), the resolved config
and the provenance. Plain HTML with the PNGs inline as base64: no template engine, no network.

:class:`RunReport` writes it (atomically) at the end of ``test`` and of ``fit`` and logs it to W&B
(``report`` as ``wandb.Html`` and a ``report`` artifact). Data facts come from the data module's
``describe_data()`` when it has one, else from its ``datasets`` (split sizes, and class counts when
the datasets hold ``labels`` and the module ``class_names``).
"""

from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import yaml

from pipelines.bootstrap import format_interval
from pipelines.calibration import TEMPERATURE_RANGE
from pipelines.evaluation_plots import threshold_text
from pipelines.files import write_text_atomic

REPORT = "report.html"
FEW_EXAMPLES = 30  # a class with fewer test examples than this gets a warning in "Limits"
WIDE_INTERVAL = 0.1  # an interval wider than this (on a [0, 1] metric) gets a warning
WIDE_PLOT = 900  # a plot wider than this many pixels (image grids, heat-map grids) is shown at the page's full width


def describe_data(datamodule: Any) -> dict[str, Any]:
    """``{"splits": {name: size}, "class_balance": {split: {class: count}}, ...}`` of a data module (see the module docstring)."""
    if datamodule is None:
        return {}
    if callable(getattr(datamodule, "describe_data", None)):
        return dict(datamodule.describe_data())
    facts: dict[str, Any] = {}
    datasets = getattr(datamodule, "datasets", None)
    if isinstance(datasets, dict):
        facts["splits"] = {name: len(ds) for name, ds in datasets.items() if hasattr(ds, "__len__")}
        names = getattr(datamodule, "class_names", None)
        balance = {}
        for split, dataset in datasets.items():
            labels = getattr(dataset, "labels", None)
            if names and labels is not None and np.asarray(labels).ndim == 1 and len(labels):
                counts = np.bincount(np.asarray(labels).astype(int).clip(0), minlength=len(names))
                balance[split] = {str(name): int(count) for name, count in zip(names, counts)}
        if balance:
            facts["class_balance"] = balance
    return facts


def _read(path: Path, loader: Any = json.loads) -> Any:
    try:
        return loader(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_fingerprint(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if not config:
        return None
    from pipelines.fingerprint import fingerprint  # content hashes of the data files the config names

    try:
        return fingerprint(config)
    except OSError:
        return None


def _number(value: Any) -> str:
    """A metric as text: 4 significant digits, or as stored (``"nan"``, ``"inf"``)."""
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def limits(summary: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """Plain-language warnings: classes with few examples, wide intervals, a calibration temperature at its bound, the
    operating point, missing test metrics."""
    notes = []
    for split in ("test", "val", "train"):
        counts = data.get("class_balance", {}).get(split, {})
        few = {name: count for name, count in counts.items() if count < FEW_EXAMPLES and (count or split != "train")}  # none in train: by design (semi-supervised)
        if few:
            listed = ", ".join(f"{name} ({count})" for name, count in few.items())
            notes.append(f"{split} split: classes with fewer than {FEW_EXAMPLES} examples: {listed}; their metrics move a lot with one example")
    test, intervals = summary.get("test", {}), summary.get("test_intervals", {})
    wide = [f"{name} ({interval['low']:.3g} to {interval['high']:.3g})" for name, interval in intervals.items()
            if interval.get("low") is not None and 0 <= interval["low"] <= interval["high"] <= 1 and interval["high"] - interval["low"] > WIDE_INTERVAL]  # fmt: skip
    if wide:
        notes.append(f"95% intervals wider than {WIDE_INTERVAL}: {', '.join(wide)}; the test set is too small to pin these metrics down")
    temperature = test.get("test/temperature")
    if isinstance(temperature, (int, float)) and not TEMPERATURE_RANGE[0] < temperature < TEMPERATURE_RANGE[1]:
        squeezed = temperature >= TEMPERATURE_RANGE[1]
        notes.append(
            f"the calibration temperature {_number(temperature)} fitted on validation is at its {'upper' if squeezed else 'lower'} bound "
            f"({_number(TEMPERATURE_RANGE[0])} to {_number(TEMPERATURE_RANGE[1])}): "
            + ("the validation logits carried no usable signal, so every calibrated probability is squeezed towards "
               + ("0.5" if "test/threshold" in test else "an even split") + " and the probabilities and operating threshold say little"
               if squeezed else "the fit wanted still sharper probabilities than allowed; they may be overconfident")
            + "; train longer or on more data, or check the validation split"
        )  # fmt: skip
    if "test/threshold" in test:
        rates = ", ".join(f"{name} {_number(test[f'test/{name}'])} on test" for name in ("sensitivity", "specificity") if f"test/{name}" in test)
        threshold = test["test/threshold"]
        shown = threshold_text(threshold) if isinstance(threshold, (int, float)) else _number(threshold)
        notes.append(f"decisions use the operating threshold {shown} chosen on validation" + (f" ({rates})" if rates else ""))
    if not test:
        notes.append("no test metrics: the run was not tested (python -m pipelines.run DOMAIN test --run_id RUN --ckpt_path best)")
    return notes


def build_report(run_dir: Path, domain: str, data: dict[str, Any] | None = None) -> str:
    """The HTML of a run folder's report, from its files (summary.json, config.yaml, provenance.json, plots/)."""
    run_dir = Path(run_dir)
    summary = _read(run_dir / "summary.json") or {}
    config = _read(run_dir / "config.yaml", yaml.safe_load)
    provenance = _read(run_dir / "provenance.json") or {}
    data = dict(data or {})
    parts = [f"<h1>{html.escape(domain)} run {html.escape(run_dir.name)}</h1>"]
    best = summary.get("best_score")
    parts.append(_table([["monitor", f"{summary.get('monitor', '')} ({summary.get('mode', '')})"], ["best score", best],
                         ["best checkpoint", summary.get("best_checkpoint")], ["epochs", summary.get("epochs")],
                         ["global step", summary.get("global_step")]], ["training", ""]))  # fmt: skip

    parts.append("<h2>Data</h2>")
    if data.get("splits"):
        parts.append(_table([[name, size] for name, size in data["splits"].items()], ["split", "examples"]))
    balance = data.get("class_balance") or {}
    if balance:
        classes = list(next(iter(balance.values())))
        parts.append(_table([[name, *(balance[s].get(name, 0) for s in balance)] for name in classes], ["class", *balance]))
    for key, value in data.items():
        if key not in ("splits", "class_balance"):
            parts.append(f"<p><b>{html.escape(key)}</b>: {html.escape(str(value))}</p>")
    digest = _data_fingerprint(config)
    if digest:
        files = "".join(f"<li><code>{html.escape(path)}</code> sha256 {sha[:16]}</li>" for path, sha in digest["files"].items())
        parts.append(f"<p>Fingerprint (data and model config, data file contents): <code>{digest['digest'][:16]}</code></p><ul>{files}</ul>")

    parts.append("<h2>Metrics (test)</h2>")
    test, intervals = summary.get("test", {}), summary.get("test_intervals", {})
    if test:
        rows = [[name, format_interval(value, intervals.get(name))] for name, value in test.items()]
        parts.append(_table(rows, ["metric", "value (95% bootstrap interval over test rows)"]))
    else:
        parts.append("<p>No test metrics yet.</p>")

    calibration = {k: v for k, v in test.items() if k.split("/")[-1] in ("ece", "ece_uncalibrated", "brier", "temperature", "threshold", "sensitivity", "specificity")}
    if calibration:
        parts.append("<h2>Calibration and operating point</h2>")
        parts.append(_table([[k, format_interval(v, intervals.get(k))] for k, v in calibration.items()], ["", "test"]))
        model = (config or {}).get("model") or {}
        model = model.get("init_args", model) if isinstance(model, dict) else {}
        chosen = {k: model[k] for k in ("calibrate", "threshold_method", "threshold_target", "cost_fn", "cost_fp") if k in model}
        if chosen:
            parts.append(f"<p>Options: <code>{html.escape(json.dumps(chosen))}</code></p>")

    parts.append("<h2>Limits</h2>")
    parts.append("<ul>" + "".join(f"<li>{html.escape(note)}</li>" for note in limits(summary, data)) + "</ul>")

    plots = sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
    if plots:
        parts.append("<h2>Plots</h2>")
        for plot in plots:
            data_bytes = plot.read_bytes()
            encoded = base64.b64encode(data_bytes).decode()
            wide = ' class="wide"' if int.from_bytes(data_bytes[16:20], "big") > WIDE_PLOT else ""  # a PNG's width (IHDR): grids of images
            parts.append(f'<figure{wide}><img alt="{html.escape(plot.stem)}" src="data:image/png;base64,{encoded}"><figcaption>{html.escape(plot.stem)}</figcaption></figure>')

    parts.append("<h2>Config</h2>")
    parts.append(f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False) if config else 'no config.yaml')}</pre>")
    parts.append("<h2>Provenance</h2>")
    invocations = provenance.get("invocations", [])
    rows = [[i.get("subcommand"), i.get("started_at"), i.get("git_commit"), i.get("seed"), i.get("hardware")] for i in invocations]
    parts.append(_table(rows, ["command", "started", "git commit", "seed", "hardware"]) if rows else "<p>No provenance.json.</p>")
    if invocations:
        packages = invocations[-1].get("packages", {})
        parts.append("<p>Packages: " + html.escape(", ".join(f"{k} {v}" for k, v in packages.items())) + "</p>")
    return PAGE.format(title=html.escape(f"{domain} {run_dir.name}"), body="\n".join(parts))


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Run report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.92em; }}
th {{ background: #f2f2f2; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
img {{ max-width: 520px; border: 1px solid #ddd; }}
figure.wide {{ display: block; }}
figure.wide img {{ max-width: 100%; }}
pre {{ background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }}
h2 {{ border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.5em; }}
</style></head>
<body>
{body}
</body></html>
"""


class RunReport(pl.Callback):
    """Write ``report.html`` at the end of ``fit`` and ``test`` (rank zero) and log it to W&B.

    Put it after :class:`pipelines.tracking.RunSummary` in the callbacks, so the summary it reads is current.
    """

    def __init__(self, run_dir: Path, domain: str) -> None:
        self.run_dir, self.domain = Path(run_dir), domain

    def write(self, trainer: pl.Trainer) -> Path | None:
        if not trainer.is_global_zero:
            return None
        path = self.run_dir / REPORT
        try:
            text = build_report(self.run_dir, self.domain, describe_data(getattr(trainer, "datamodule", None)))
        except Exception as error:  # the report never fails a run that trained and tested
            print(f"[pipelines] {REPORT} not written: {type(error).__name__}: {error}", file=sys.stderr)
            return None
        write_text_atomic(path, text)
        from pipelines.tracking import wandb_loggers

        for logger in wandb_loggers(trainer):
            import wandb

            logger.experiment.log({"report": wandb.Html(text, inject=False, data_is_not_path=True)})
            artifact = wandb.Artifact(f"report-{logger.experiment.id}", type="report")
            artifact.add_file(str(path), name=REPORT)
            logger.experiment.log_artifact(artifact)
        return path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer)
