"""``python -m pipelines.dashboard``: the W&B workspace of every registered domain, built offline with ``wandb-workspaces``;
every panel names a metric the domain really logs: its tiny run's ``metrics.jsonl`` and figures, the numbers a real
``pipelines.monitor --wandb`` check logs (drift, alert budget, serving), and the retraining decisions' names (which a real
retrain's W&B files hold: ``tests/test_retrain_policy.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.dashboard import SECTIONS, logged_keys, main, panel_metrics
from pipelines.domain_registry import available_domains, get_domain
from pipelines.monitor_live import LIVE_KEYS
from pipelines.retrain_wandb import DECISION_KEYS
from tests.conftest import ROOT, child_env
from tests.processes import run_child


@pytest.fixture(scope="module")
def finance_bundle(tiny_run, tmp_path_factory) -> Path:
    """The finance tiny run's bundle."""
    from pipelines.export import export_checkpoint

    return export_checkpoint(get_domain("finance"), tiny_run("finance") / "checkpoints" / "last.ckpt", "onnx", tmp_path_factory.mktemp("finance-bundle") / "bundle")


@pytest.fixture(scope="module")
def monitor_logged(finance_bundle, tmp_path_factory) -> set[str]:
    """The keys a real ``pipelines.monitor --wandb`` check logs on a request log the finance tiny run's bundle answered."""
    from pipelines.bundle_runtime import Bundle
    from pipelines.reference import load_reference, reference_frame
    from pipelines.request_log import RequestLog, item_features, item_outputs
    from pipelines.serving_server import model_identity

    root, bundle = tmp_path_factory.mktemp("dashboard-monitor"), finance_bundle
    stats = load_reference(bundle)
    features = reference_frame(stats)[stats["columns"]].dropna().to_numpy(np.float32)
    outputs = Bundle(bundle).run(numeric=features)
    version = model_identity(json.loads((bundle / "metadata.json").read_text()))["version"]  # what the server logs
    RequestLog(root / "requests.jsonl").append([
        {"time": f"2026-11-30T10:{i // 60 % 60:02d}:{i % 60:02d}.000+00:00", "model": "finance", "version": version, "form": "rows",
         "features": item_features({"numeric": features}, i, stats), "outputs": item_outputs(outputs, i)}
        for i in range(len(features))
    ])  # fmt: skip
    result = run_child([sys.executable, "-m", "pipelines.monitor", str(bundle), str(root / "requests.jsonl"), "--wandb", "--json", str(root / "check.json")],
                       300, cwd=ROOT, env=child_env(WANDB_MODE="offline", WANDB_DIR=str(root)))  # the offline W&B run in the test folder, not the checkout
    assert result.returncode in (0, 3) and "logged to W&B (offline" in result.stdout, result.stdout + result.stderr
    return set(json.loads((root / "check.json").read_text())["logged"])


@pytest.mark.parametrize("domain", available_domains())
def test_every_panel_names_a_metric_the_domain_logs(domain, tiny_run, monitor_logged, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tiny_run(domain)
    scalars, figures = logged_keys(run)
    out = tmp_path / "dashboard.json"
    assert main([domain, "--run_dir", str(run), "--out", str(out)]) == 0
    assert "not published" in capsys.readouterr().out
    spec = json.loads(out.read_text())
    named = panel_metrics(spec)
    assert list(named) == list(SECTIONS) and spec["project"] == f"domain-pipelines-{domain}"
    for section in SECTIONS[:3]:
        assert named[section], f"{domain}: section {section} has no metric panel"
        # the retraining decision runs' names are checked against a real retrain's W&B files in tests/test_retrain_policy.py
        unknown = sorted(set(named[section]) - scalars - figures - (set(DECISION_KEYS) if section == "Retraining history" else set()))
        assert not unknown, f"{domain} {section}: panels name {unknown}, which the run never logged ({sorted(scalars)}, figures {sorted(figures)})"
    for section in SECTIONS[3:]:  # the live serving names (LIVE_KEYS) are checked against a real server's scrape in tests/test_serve_operations.py
        unknown = set(named[section]) - monitor_logged - set(LIVE_KEYS)
        assert named[section] and not unknown, (domain, section, sorted(unknown))
    declared = get_domain(domain)
    selection = next(m for m in declared.selection or (declared.monitor.replace("val/", "test/", 1),) if m in scalars)
    assert selection in named["Retraining history"]
    assert ("alert_budget/live_rate" in named["Drift scores"]) == (domain == "finance")
    assert any(k.startswith("val/") for k in named["Training curves"]), named["Training curves"]


def test_a_run_without_metrics_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["finance", "--run_dir", str(tmp_path / "run"), "--out", str(tmp_path / "d.json")]) == 2
    assert "no metrics.jsonl" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "d.json").exists()  # a paragraph wraps long paths
    assert main(["financ", "--run_dir", str(tmp_path / "run")]) == 2
    assert "did you mean 'finance'" in " ".join(capsys.readouterr().err.split())
    # another domain's run (trial 4): its panels would name healthcare's metrics in the finance project
    (tmp_path / "run" / "provenance.json").write_text(json.dumps({"domain": "healthcare", "run_id": "run"}))
    assert main(["finance", "--run_dir", str(tmp_path / "run"), "--out", str(tmp_path / "d.json")]) == 2
    assert "a healthcare run, not finance" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "d.json").exists()


def test_raw_transactions_against_the_models_preprocessed_reference_are_refused(finance_bundle, tmp_path, capsys):
    """The finance tiny run's bundle holds statistics of its preprocessed features (log-scaled, standardised amounts,
    one-hot categories): the raw transactions it was trained on are refused (exit 2) naming the missing features, and
    their raw amounts are refused as other units, not reported as drift (exit 3)."""
    from domains.finance.synthetic import make_card_transactions
    from pipelines.monitor import main as monitor_main

    bundle = finance_bundle
    make_card_transactions(1200).to_csv(tmp_path / "raw.csv", index=False)
    assert monitor_main([str(bundle), str(tmp_path / "raw.csv")]) == 2
    refused = " ".join(capsys.readouterr().err.split())
    assert "raw.csv: 31 of the 37 features of" in refused and "'timestamp.hour_sin'" in refused and "model's input 'numeric'" in refused, refused
    assert monitor_main([str(bundle), str(tmp_path / "raw.csv"), "--columns", "amount,customer_age"]) == 2
    refused = " ".join(capsys.readouterr().err.split())
    assert "not in the units of" in refused and "'amount': median" in refused and "request log" in refused, refused


def test_sigterm_stops_the_dashboard_honestly_and_keeps_an_earlier_spec(tiny_run, tmp_path, child_processes):
    """A real SIGTERM to ``python -m pipelines.dashboard`` at two moments of its run: each time a non-zero exit (143 once
    main's handler is in place, -15 during the interpreter's imports), the earlier spec byte for byte and no temporary
    file beside it; or, had it finished first, exit 0 and a complete new spec."""
    import signal
    import time

    out = tmp_path / "dashboard.json"
    outcomes = []
    for delay in (1.0, 6.0):
        out.write_text('{"earlier": true}\n')
        process = child_processes.start([sys.executable, "-m", "pipelines.dashboard", "finance", "--run_dir", str(tiny_run("finance")), "--out", str(out)],
                                        cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        time.sleep(delay)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        outcomes.append(process.returncode)
        assert [p.name for p in tmp_path.iterdir()] == ["dashboard.json"], "no temporary file"
        if process.returncode in (143, -signal.SIGTERM) and out.read_text() == '{"earlier": true}\n':
            assert process.returncode == -signal.SIGTERM or "stopped by SIGTERM" in output, output
        else:  # it wrote the new spec before the signal came (the signal may still land while the interpreter exits: -15)
            assert process.returncode in (0, -signal.SIGTERM) and json.loads(out.read_text()) and "panelBankConfig" in out.read_text(), (process.returncode, output)
    print(f"exit codes after SIGTERM at 1 s and 6 s: {outcomes}")
