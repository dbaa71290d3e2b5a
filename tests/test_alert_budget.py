"""Alert budgets on production traffic, on real data (ADBench campaign, ../shared/data).

The data is cut into three periods: the model is trained on the first, the second is recent traffic
the deployed model scored (``predict``'s output, unlabelled), the third is the next period. The
budget threshold fitted at training misses its 0.5 % budget on the next period (the monitor flags it,
exit 3); refitted on the recent traffic with ``--recalibrate-budget`` (no retraining, a new file, the
original untouched) the next period's alert rate is within the budget's interval (exit 0).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.domain_registry import get_domain
from pipelines.export import export_checkpoint
from pipelines.files import sha256_file
from pipelines.monitor_budget import KEY, alert_count_interval, top_share_threshold
from tests.conftest import ROOT, child_env, run_pipeline, shared_file

TRAIN_ROWS, RECENT_ROWS = 24000, 8000
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--data.batch_size=256"]


def monitor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.monitor", *args], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def periods(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model trained on campaign's first 24000 rows, and its scores of the next 8000 (recent) and the last 9188 (next period)."""
    with np.load(shared_file("finance/campaign.npz")) as archive:
        features, labels = archive["X"], archive["y"]
    root = tmp_path_factory.mktemp("budget")
    np.savez(root / "train.npz", X=features[:TRAIN_ROWS], y=labels[:TRAIN_ROWS])
    runs = root / "runs"
    run_pipeline("finance", "fit", "--runs_dir", str(runs), "--run_id", "p1", *QUIET, "--trainer.max_epochs=2", "--data.path", str(root / "train.npz"))
    ckpt = runs / "finance" / "p1" / "checkpoints" / "last.ckpt"
    found = {"root": root, "ckpt": ckpt}
    for name, rows in (("recent", slice(TRAIN_ROWS, TRAIN_ROWS + RECENT_ROWS)), ("next", slice(TRAIN_ROWS + RECENT_ROWS, None))):
        pd.DataFrame(features[rows], columns=[f"x{j}" for j in range(features.shape[1])]).to_parquet(root / f"{name}.parquet")
        run_pipeline("finance", "predict", "--runs_dir", str(runs), "--run_id", "p1", "--ckpt_path", str(ckpt), *QUIET,
                     "--data.path", str(root / "train.npz"), "--data.predict_path", str(root / f"{name}.parquet"), "--output", f"{name}-scores.csv")  # fmt: skip
        found[name] = runs / "finance" / "p1" / f"{name}-scores.csv"
    found["next_labels"] = labels[TRAIN_ROWS + RECENT_ROWS :]
    return found


def budget_of(result: Path) -> dict:
    return json.loads(result.read_text())["alert_budget"]


def test_recalibrated_budget_holds_on_the_next_period_where_the_trained_one_did_not(periods):
    import torch

    root, ckpt = periods["root"], periods["ckpt"]
    trained = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert trained[KEY]["fitted_on"] == "validation rows labelled normal" and trained[KEY]["rows"] < trained[KEY]["validation_rows"]
    original = sha256_file(ckpt)

    before = monitor(str(ckpt), str(periods["next"]), "--only", "budget", "--json", str(root / "before.json"))
    assert before.returncode == 3, before.stdout + before.stderr
    assert "BUDGET alert budget 0.5 %" in before.stdout and "OUTSIDE the interval" in before.stdout, before.stdout
    b = budget_of(root / "before.json")
    assert b["outside"] and not b["interval"][0] <= b["live_rate"] <= b["interval"][1] and b["rows"] == len(periods["next_labels"])

    recalibrated = root / "recalibrated.ckpt"
    run = monitor(str(ckpt), str(periods["recent"]), "--recalibrate-budget", str(recalibrated))
    assert run.returncode == 0 and recalibrated.is_file(), run.stdout + run.stderr
    assert sha256_file(ckpt) == original, "the earlier model is never overwritten"
    scores = pd.read_csv(periods["recent"])["score"].to_numpy()
    saved = torch.load(recalibrated, map_location="cpu", weights_only=True)
    assert float(saved["state_dict"]["budget_threshold"]) == pytest.approx(top_share_threshold(scores, 0.005))
    assert saved[KEY]["fitted_on"] == "window" and saved[KEY]["rows"] == RECENT_ROWS and str(periods["recent"]) in saved[KEY]["window"]
    assert torch.equal(saved["state_dict"]["threshold"], trained["state_dict"]["threshold"]), "is_alert (best-F1 threshold) is left as it was"
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in trained["state_dict"].items() if k != "budget_threshold"), "no retraining"

    after = monitor(str(recalibrated), str(periods["next"]), "--only", "budget", "--json", str(root / "after.json"))
    assert after.returncode == 0, after.stdout + after.stderr
    a = budget_of(root / "after.json")
    assert not a["outside"] and a["interval"][0] <= a["live_rate"] <= a["interval"][1] and a["fitted_on"] == "window"
    assert abs(a["live_rate"] - 0.005) < abs(b["live_rate"] - 0.005), (a, b)
    print(f"next period: trained budget {100 * b['live_rate']:.3f} % -> recalibrated {100 * a['live_rate']:.3f} % (budget 0.5 %, interval {a['interval']})")

    # the recalibrated checkpoint exports with its new budget and the record of what it was fitted on
    bundle = export_checkpoint(get_domain("finance"), recalibrated, "onnx", root / "bundle")
    domain = json.loads((bundle / "metadata.json").read_text())["domain_metadata"]
    assert domain["budget_threshold"] == pytest.approx(float(saved["state_dict"]["budget_threshold"])) and domain[KEY]["fitted_on"] == "window"


def test_a_bundle_is_recalibrated_into_a_new_bundle_and_bad_requests_change_nothing(periods, tmp_path):
    bundle = export_checkpoint(get_domain("finance"), periods["ckpt"], "onnx", tmp_path / "bundle")
    before = (bundle / "metadata.json").read_bytes()
    out = tmp_path / "recalibrated"
    run = monitor(str(bundle), str(periods["recent"]), "--recalibrate-budget", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert (bundle / "metadata.json").read_bytes() == before
    old, new = (json.loads((b / "metadata.json").read_text()) for b in (bundle, out))
    assert new["domain_metadata"][KEY]["fitted_on"] == "window" and new["model_version"].startswith(f"sha256-{old['source_checkpoint']['sha256'][:12]}+budget-")
    assert (out / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    after = monitor(str(out), str(periods["next"]), "--only", "budget")
    assert after.returncode == 0, after.stdout + after.stderr

    recent = pd.read_csv(periods["recent"])
    recent.head(500).to_csv(tmp_path / "short.csv", index=False)
    recent.drop(columns=["score"]).to_csv(tmp_path / "features.csv", index=False)
    cases = [
        (periods["recent"], ["--recalibrate-budget", str(out)], "already exists"),  # never over an earlier model
        (tmp_path / "short.csv", ["--recalibrate-budget", str(tmp_path / "b2")], "a threshold needs at least 2000 rows"),
        (periods["recent"], ["--only", "budget", "--budget-alpha", "2"], "--budget-alpha and --mmd-alpha in (0, 1)"),
        (tmp_path / "features.csv", ["--only", "budget"], "has no score column"),
        (tmp_path / "features.csv", ["--recalibrate-budget", str(tmp_path / "b3")], "has no score column"),
    ]
    for window, extra, message in cases:
        result = monitor(str(bundle), str(window), *extra)
        assert result.returncode == 2 and message in " ".join(result.stderr.split()), (extra, result.stderr)
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "features.csv", "recalibrated", "short.csv"], "nothing half-written"


def test_the_interval_widens_with_the_fits_own_sampling_error():
    """A threshold fitted on few rows misses its budget by more than binomial noise: the beta-binomial interval accounts for it."""
    rng = np.random.default_rng(0)
    binomial = alert_count_interval(10000, 0.005, 0.01)
    small_fit = alert_count_interval(10000, 0.005, 0.01, fitted_rows=450)
    assert small_fit[0] <= binomial[0] and small_fit[1] > binomial[1] + 30
    flagged = {"binomial": 0, "beta-binomial": 0}
    for _ in range(300):  # thresholds fitted on 450 rows, checked on 10000 fresh rows of the same distribution
        threshold = top_share_threshold(rng.normal(size=450), 0.005)
        alerts = int((rng.normal(size=10000) >= threshold).sum())
        flagged["binomial"] += not binomial[0] <= alerts <= binomial[1]
        flagged["beta-binomial"] += not small_fit[0] <= alerts <= small_fit[1]
    assert flagged["beta-binomial"] <= 9 < 60 <= flagged["binomial"], flagged  # about 1 % false alarms, not a third
