"""``python -m pipelines.dashboard DOMAIN [--run_dir DIR] [--runs_dir runs] [--entity E] [--project P] [--out FILE]``: a W&B workspace per domain, defined in code.

Built with ``wandb-workspaces`` (``wandb_workspaces.workspaces.Workspace``; it serialises offline),
with five sections whose panels name only metrics the domain really logs, read from a run folder
(``--run_dir``, default the domain's newest run under ``--runs_dir``):

- **Training curves**: one line plot per metric logged as ``train/X`` and/or ``val/X`` (``metrics.jsonl``), against ``epoch``;
- **Test plots**: a bar per run for each declared test metric the run logged (``DomainSpec.test_metrics``), and a media
  panel per test figure (``plots/test_*.png``, logged to W&B under ``test/...``);
- **Retraining history**: what each retraining decision run logs (:mod:`pipelines.retrain_wandb`): challenger and champion
  scores on the evaluation set, promoted/rejected/failed and the registered version per attempt; and the challenger's own
  test metric (the first of ``DomainSpec.selection``, else the monitor's ``test/`` name, the run logged);
- **Drift scores** and **Serving metrics**: what ``python -m pipelines.monitor ... --wandb`` logs (:mod:`pipelines.monitor_wandb`):
  drift scores, the alert rate against the budget (a model with one), the window's request rate, mean score and alert share;
  and what ``python -m pipelines.monitor_live URL --wandb`` logs from a running server's ``/metrics`` (:mod:`pipelines.monitor_live`):
  request rate, error share, latency quantiles, requests in flight.

With a W&B key (``WANDB_API_KEY``) the workspace is saved to W&B (``--entity``, default ``$WANDB_ENTITY`` or the key's
default entity) and its URL printed; without one (or with ``--offline``) nothing is sent. The spec (the workspace as W&B
stores it, JSON) is always written, complete or absent, to ``--out`` (default ``<run folder>/dashboard.json``).
Exit status: 0 written (and published when a key is present); 2 bad input (an unknown domain, no run folder, a run without metrics); 1 a failed publication;
143 stopped by SIGTERM (nothing half-written).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from pipelines.domain_registry import DomainSpec
from pipelines.errors import EXIT_BAD_INPUT, InputError, did_you_mean, paragraph
from pipelines.monitor_live import LIVE_KEYS
from pipelines.monitor_wandb import BUDGET_KEYS, DRIFT_KEYS, SERVING_KEYS
from pipelines.option_spelling import OptionParser
from pipelines.retrain_wandb import JOB_TYPE as DECISION_JOB_TYPE, OUTCOME_KEYS, SCORE_KEYS, VERSION_KEY
from pipelines.stops import sigterm_as_exit

SECTIONS = ("Training curves", "Test plots", "Retraining history", "Drift scores", "Serving metrics")
ROW_FIELDS = {"stage", "step"}  # metrics.jsonl bookkeeping, not metrics ("epoch" is logged to W&B by Lightning)


def logged_keys(run_dir: Path) -> tuple[set[str], set[str]]:
    """The scalar metrics (``metrics.jsonl``) and figure keys (``plots/*.png``: ``test_pr_curve.png`` -> ``test/pr_curve``) a run logged."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise InputError(f"{run_dir}: no metrics.jsonl; give a run folder of `python -m pipelines.run DOMAIN` that trained (--run_dir)")
    scalars = {key for line in metrics.read_text().splitlines() if line.strip() for key in json.loads(line) if key not in ROW_FIELDS}
    figures = {p.stem.replace("_", "/", 1) for p in (run_dir / "plots").glob("*.png")} if (run_dir / "plots").is_dir() else set()
    return scalars, figures


def has_alert_budget(run_dir: Path) -> bool:
    """Whether the run's checkpoint has an alert budget (:mod:`pipelines.monitor_budget`): the monitor then logs ``alert_budget/*``."""
    from pipelines.monitor_budget import read_budget

    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    return checkpoint.is_file() and read_budget(checkpoint) is not None


def section_panels(spec: DomainSpec, scalars: set[str], figures: set[str], budget: bool) -> dict[str, list[Any]]:
    """The panels of each section (``wandb_workspaces.reports.v2`` panels), naming only logged keys."""
    import wandb_workspaces.reports.v2 as wr

    names = sorted({key.split("/", 1)[1] for key in scalars if key.startswith(("train/", "val/"))})
    training = [wr.LinePlot(title=name, x="epoch", y=[f"{stage}/{name}" for stage in ("train", "val") if f"{stage}/{name}" in scalars]) for name in names]
    tests = [wr.BarPlot(title=metric, metrics=[metric]) for metric, _ in spec.test_metrics if metric in scalars]
    tests += [wr.MediaBrowser(title=key, media_keys=[key]) for key in sorted(figures) if key.startswith("test/")]
    from pipelines.selection import evaluation_metric_key

    selection = next((metric for metric in spec.selection or (evaluation_metric_key(spec.monitor),) if metric in scalars), None)
    history = [
        wr.BarPlot(title="evaluation-set score per attempt: challenger and champion", metrics=list(SCORE_KEYS)),
        wr.BarPlot(title="decision per attempt (1 = yes)", metrics=list(OUTCOME_KEYS)),
        wr.BarPlot(title="registered version per attempt", metrics=[VERSION_KEY]),
        wr.MarkdownPanel(markdown=(
            f"Each attempt of `python -m pipelines.retrain {spec.name}` that trained a challenger is a W&B run of group `retrain-{spec.name}`, "
            f"job type `{DECISION_JOB_TYPE}` (`pipelines.retrain_wandb`): its scores on the registry's evaluation set, its decision, and in its "
            f"summary the reason (`retrain/reason`), the metric and the version. The registry's `history.jsonl` is the source of truth "
            f"(`python -m pipelines.registry {spec.name} history`)."
        )),
    ]  # fmt: skip
    if selection:
        history.insert(0, wr.BarPlot(title=f"{selection} per run (the attempts' evaluation runs, job type retrain-eval)", metrics=[selection]))
    drift = [wr.BarPlot(title=key, metrics=[key]) for key in DRIFT_KEYS]
    if budget:
        drift.append(wr.BarPlot(title="alert rate against the budget (interval low/high)", metrics=list(BUDGET_KEYS[:4])))
        drift.append(wr.BarPlot(title="alert rate outside the budget (1 = yes)", metrics=[BUDGET_KEYS[4]]))
    serving = [wr.BarPlot(title=key, metrics=[key]) for key in SERVING_KEYS if budget or key not in ("serving/score_mean", "serving/alert_share")]
    serving.append(wr.BarPlot(title="live: requests per second and error share", metrics=list(LIVE_KEYS[:2])))
    serving.append(wr.BarPlot(title="live: latency quantiles (s)", metrics=list(LIVE_KEYS[2:5])))
    serving.append(wr.BarPlot(title="live: requests in flight", metrics=[LIVE_KEYS[5]]))
    serving.append(wr.MarkdownPanel(markdown="`serving/window_rows` and the other window panels: the request log's windows as `pipelines.monitor --wandb` "
                                             "logs them. The `live:` panels: the server's Prometheus `/metrics` between two reads, as "
                                             "`python -m pipelines.monitor_live URL --wandb` logs them."))  # fmt: skip
    return dict(zip(SECTIONS, (training, tests, history, drift, serving)))


def build_workspace(spec: DomainSpec, run_dir: Path, entity: str, project: str) -> Any:
    """The domain's ``wandb_workspaces.workspaces.Workspace`` (not saved)."""
    import wandb_workspaces.workspaces as ws

    scalars, figures = logged_keys(run_dir)
    panels = section_panels(spec, scalars, figures, has_alert_budget(run_dir))
    sections = [ws.Section(name=name, panels=panels[name], is_open=True) for name in SECTIONS]
    return ws.Workspace(entity=entity, project=project, name=f"{spec.name} pipeline", sections=sections)


def workspace_spec(workspace: Any) -> dict[str, Any]:
    """The workspace as W&B stores it (its view model as JSON), built offline."""
    return workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")  # the library's own serialisation; no public export exists


def panel_metrics(spec: dict[str, Any]) -> dict[str, list[str]]:
    """Every metric (and x axis) each section's panels of a workspace spec name, by section."""
    found: dict[str, list[str]] = {}
    for section in spec["spec"]["section"]["panelBankConfig"]["sections"]:
        names = found.setdefault(section["name"], [])
        for panel in section["panels"]:
            config = panel.get("config", {})
            names += [*config.get("metrics", []), *config.get("mediaKeys", []), *([config["xAxis"]] if "xAxis" in config else [])]
    return found


def newest_run(domain: str, runs_dir: Path) -> Path:
    folder = runs_dir / domain
    runs = sorted((p for p in folder.iterdir() if (p / "metrics.jsonl").is_file()), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not runs:
        raise InputError(f"{folder}: no run with metrics; train one (python -m pipelines.run {domain}) or name it with --run_dir")
    return runs[-1]


@sigterm_as_exit("dashboard")  # a stopped dashboard leaves no temporary file beside --out, and an earlier spec as it was; exit 143
def main(argv: list[str] | None = None) -> int:
    from pipelines.domain_registry import available_domains, get_domain
    from pipelines.files import write_json_atomic
    from pipelines.tracking import wandb_mode

    parser = OptionParser(prog="python -m pipelines.dashboard", description=__doc__.splitlines()[0].strip("`. "))
    parser.add_argument("domain", help=f"one of {', '.join(available_domains())}")
    parser.add_argument("--run_dir", default=None, help="the run folder whose logged metrics the panels name (default: the newest run)")
    parser.add_argument("--runs_dir", default="runs")
    parser.add_argument("--entity", default=None, help="W&B entity (default: $WANDB_ENTITY, else the key's default entity)")
    parser.add_argument("--project", default=None, help="W&B project (default: $WANDB_PROJECT or domain-pipelines-DOMAIN, as the runs log to)")
    parser.add_argument("--out", default=None, help="where to write the spec (default: <run folder>/dashboard.json)")
    parser.add_argument("--offline", action="store_true", help="write the spec only, even with a W&B key")
    args = parser.parse_args(argv)
    try:
        if args.domain not in available_domains():
            raise InputError(f"unknown domain {args.domain!r}{did_you_mean(args.domain, available_domains())}; expected one of {available_domains()}")
        spec = get_domain(args.domain)
        run_dir = Path(args.run_dir) if args.run_dir else newest_run(args.domain, Path(args.runs_dir))
        if not run_dir.is_dir():
            raise InputError(f"--run_dir {run_dir}: no such folder")
        owner = json.loads((run_dir / "provenance.json").read_text()).get("domain") if (run_dir / "provenance.json").is_file() else None
        if owner and owner != args.domain:  # its panels would name the other domain's metrics, in this domain's project
            raise InputError(f"--run_dir {run_dir}: a {owner} run, not {args.domain}; give a {args.domain} run, or build the {owner} dashboard")
        online = not args.offline and wandb_mode() == "online" and bool(os.environ.get("WANDB_API_KEY"))
        entity = args.entity or os.environ.get("WANDB_ENTITY") or (_default_entity() if online else "offline")
        project = args.project or os.environ.get("WANDB_PROJECT", f"domain-pipelines-{args.domain}")
        workspace = build_workspace(spec, run_dir, entity, project)
    except ValueError as error:
        print(paragraph(str(error)), file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.out) if args.out else run_dir / "dashboard.json"
    write_json_atomic(out, workspace_spec(workspace))
    print(f"[pipelines] {spec.name} dashboard spec: {out} ({', '.join(f'{name}: {len(s.panels)} panels' for name, s in zip(SECTIONS, workspace.sections))})")
    if not online:
        print("[pipelines] no W&B key (WANDB_API_KEY) or --offline: not published; the spec is the workspace W&B would store")
        return 0
    try:
        workspace.save()
    except Exception as error:  # noqa: BLE001 - the spec is written; say why publishing failed
        print(f"[pipelines] error: publishing the workspace to W&B failed ({type(error).__name__}: {error}); the spec is in {out}", file=sys.stderr)
        return 1
    print(f"[pipelines] published: {workspace.url}")
    return 0


def _default_entity() -> str:
    import wandb

    return wandb.Api().default_entity


if __name__ == "__main__":
    sys.exit(main())
