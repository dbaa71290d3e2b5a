"""Alert budgets on production traffic, on real data (ADBench campaign, ../shared/data).

The rows are in time order, and their score tail moves: with a model trained on the first 24000 rows,
the rows above a fixed high score fall from about 6 per 1000 before row 33000 to about 2 per 1000 after
it (measured: 4, 7, 7, 3, 8, 3, 10, 4, 8, then 1, 2, 1, 1, 3, 5, 1, 1, 0 per 1000 rows from row 24000).
The deployed model scores rows 33000-35999 (recent traffic, ``predict``'s output, unlabelled) and the
next period (the last 5188 rows). The budget threshold fitted at training
misses its 0.5 % budget on the next period (the monitor flags it, exit 3); refitted on the recent
traffic with ``--recalibrate_budget`` (no retraining, a new file, the original untouched) the next
period's alert rate is within the budget's interval (exit 0).
"""

from __future__ import annotations

import contextlib
import io
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
from tests.processes import run_child

TRAIN_ROWS, RECENT, NEXT = 24000, slice(33000, 36000), slice(36000, None)
RECENT_ROWS = RECENT.stop - RECENT.start
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--data.batch_size=256"]


def monitor(*args: str) -> subprocess.CompletedProcess:
    """``python -m pipelines.monitor ARGS`` as a real process."""
    return run_child([sys.executable, "-m", "pipelines.monitor", *args], 300, cwd=ROOT, env=child_env())


def monitor_here(*args: str) -> subprocess.CompletedProcess:
    """The same command run in this process (its ``main``; no interpreter start-up), with its exit code and output."""
    from pipelines.monitor import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as stop:  # a usage error: the parser exits 2
            code = stop.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def periods(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model trained on campaign's first 24000 rows, and its scores of rows 33000-35999 (recent) and the last 5188 (next period)."""
    with np.load(shared_file("finance/campaign.npz")) as archive:
        features, labels = archive["X"], archive["y"]
    root = tmp_path_factory.mktemp("budget")
    np.savez(root / "train.npz", X=features[:TRAIN_ROWS], y=labels[:TRAIN_ROWS])
    runs = root / "runs"
    run_pipeline("finance", "fit", "--runs_dir", str(runs), "--run_id", "p1", *QUIET, "--trainer.max_epochs=2", "--data.path", str(root / "train.npz"))
    ckpt = runs / "finance" / "p1" / "checkpoints" / "last.ckpt"
    found = {"root": root, "ckpt": ckpt}
    for name, rows in (("recent", RECENT), ("next", NEXT)):
        pd.DataFrame(features[rows], columns=[f"x{j}" for j in range(features.shape[1])]).to_parquet(root / f"{name}.parquet")
        run_pipeline("finance", "predict", "--runs_dir", str(runs), "--run_id", "p1", "--ckpt_path", str(ckpt), *QUIET,
                     "--data.path", str(root / "train.npz"), "--data.predict_path", str(root / f"{name}.parquet"), "--output", f"{name}-scores.csv")  # fmt: skip
        found[name] = runs / "finance" / "p1" / f"{name}-scores.csv"
    found["next_labels"] = labels[NEXT]
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
    run = monitor(str(ckpt), str(periods["recent"]), "--recalibrate_budget", str(recalibrated))
    assert run.returncode == 0 and recalibrated.is_file(), run.stdout + run.stderr
    assert sha256_file(ckpt) == original, "the earlier model is never overwritten"
    scores = pd.read_csv(periods["recent"])["score"].to_numpy()
    saved = torch.load(recalibrated, map_location="cpu", weights_only=True)
    assert float(saved["state_dict"]["budget_threshold"]) == pytest.approx(top_share_threshold(scores, 0.005))
    assert saved[KEY]["fitted_on"] == "window" and saved[KEY]["rows"] == RECENT_ROWS and str(periods["recent"]) in saved[KEY]["window"]
    assert torch.equal(saved["state_dict"]["threshold"], trained["state_dict"]["threshold"]), "is_alert (best-F1 threshold) is left as it was"
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in trained["state_dict"].items() if k != "budget_threshold"), "no retraining"

    after = monitor_here(str(recalibrated), str(periods["next"]), "--only", "budget", "--json", str(root / "after.json"))
    assert after.returncode == 0, after.stdout + after.stderr
    a = budget_of(root / "after.json")
    assert not a["outside"] and a["interval"][0] <= a["live_rate"] <= a["interval"][1] and a["fitted_on"] == "window"
    assert abs(a["live_rate"] - 0.005) < abs(b["live_rate"] - 0.005), (a, b)
    print(f"next period: trained budget {100 * b['live_rate']:.3f} % -> recalibrated {100 * a['live_rate']:.3f} % (budget 0.5 %, interval {a['interval']}, fit spread {a['fit_spread']})")

    # the recalibrated checkpoint exports with its new budget and the record of what it was fitted on
    bundle = export_checkpoint(get_domain("finance"), recalibrated, "onnx", root / "bundle")
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["domain_metadata"]["budget_threshold"] == pytest.approx(float(saved["state_dict"]["budget_threshold"]))
    assert metadata[KEY]["fitted_on"] == "window" and metadata[KEY]["threshold"] == pytest.approx(metadata["domain_metadata"]["budget_threshold"])


def test_a_bundle_is_recalibrated_into_a_new_bundle_and_bad_requests_change_nothing(periods, tmp_path):
    bundle = export_checkpoint(get_domain("finance"), periods["ckpt"], "onnx", tmp_path / "bundle")
    before = (bundle / "metadata.json").read_bytes()
    out = tmp_path / "recalibrated"
    run = monitor_here(str(bundle), str(periods["recent"]), "--recalibrate_budget", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert (bundle / "metadata.json").read_bytes() == before
    old, new = (json.loads((b / "metadata.json").read_text()) for b in (bundle, out))
    assert old[KEY]["fitted_on"] == "validation rows labelled normal" and new[KEY]["fitted_on"] == "window" and new["model_version"].startswith(f"sha256-{old['source_checkpoint']['sha256'][:12]}+budget-")
    assert (out / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    assert [oct(p.stat().st_mode & 0o777) for p in (out, out / "metadata.json")] == ["0o755", "0o644"], "readable by a server running as another user"
    after = monitor_here(str(out), str(periods["next"]), "--only", "budget")
    assert after.returncode == 0, after.stdout + after.stderr

    recent = pd.read_csv(periods["recent"])
    recent.head(500).to_csv(tmp_path / "short.csv", index=False)
    recent.drop(columns=["score"]).to_csv(tmp_path / "features.csv", index=False)
    cases = [
        (periods["recent"], ["--recalibrate_budget", str(out)], "already exists"),  # never over an earlier model
        (tmp_path / "short.csv", ["--recalibrate_budget", str(tmp_path / "b2")], "a threshold needs at least 2000 rows"),
        (periods["recent"], ["--only", "budget", "--budget_alpha", "2"], "--budget_alpha and --mmd_alpha must be in (0, 1)"),
        (tmp_path / "features.csv", ["--only", "budget"], "has no score column"),
        (tmp_path / "features.csv", ["--recalibrate_budget", str(tmp_path / "b3")], "has no score column"),
    ]
    for window, extra, message in cases:
        result = monitor_here(str(bundle), str(window), *extra)
        assert result.returncode == 2 and message in " ".join(result.stderr.split()), (extra, result.stderr)
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "features.csv", "recalibrated", "short.csv"], "nothing half-written"


def test_sigterm_during_recalibration_leaves_the_new_checkpoint_complete_or_absent(periods, tmp_path, child_processes):
    """A real SIGTERM the moment the recalibrated checkpoint's temporary file appears: exit 143, no new checkpoint and no
    temporary file (or, had the write finished first, exit 0 and a complete one); the original is never touched."""
    import signal
    import time

    import torch

    original, out = sha256_file(periods["ckpt"]), tmp_path / "recalibrated.ckpt"
    process = child_processes.start([sys.executable, "-m", "pipelines.monitor", str(periods["ckpt"]), str(periods["recent"]), "--recalibrate_budget", str(out)],
                                    cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".recalibrated.ckpt.*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    caught = bool(list(tmp_path.glob(".recalibrated.ckpt.*"))) and process.poll() is None
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    print(f"signal during the write: {caught}, exit {process.returncode}")
    assert [p.name for p in tmp_path.iterdir()] in ([], ["recalibrated.ckpt"]), (process.returncode, output[-3000:])
    assert sha256_file(periods["ckpt"]) == original
    if process.returncode == 143:
        assert not out.exists() and "stopped by SIGTERM" in output, output
    else:  # the write finished before the signal came (-15: it came after main returned, with everything written)
        assert process.returncode in (0, -signal.SIGTERM), (process.returncode, output)
        assert float(torch.load(out, map_location="cpu", weights_only=True)["state_dict"]["budget_threshold"]) > 0


def test_the_interval_holds_a_threshold_that_meets_the_budget_and_flags_one_that_does_not():
    """The binomial interval measures what its name says: a threshold whose true share is the budget is flagged in about
    alpha of fresh windows; one that flags 0.3 % instead of 0.5 % in nearly every window of 20000 rows."""
    from scipy.stats import norm

    from pipelines.monitor_budget import fit_spread

    rng = np.random.default_rng(0)
    low, high = alert_count_interval(20000, 0.005, 0.01)
    flagged = {}
    for name, share in (("exact", 0.005), ("short", 0.003)):
        threshold = norm.isf(share)  # the true share of N(0, 1) traffic at or above it
        counts = np.array([(rng.normal(size=20000) >= threshold).sum() for _ in range(300)])
        flagged[name] = int(((counts < low) | (counts > high)).sum())
    assert flagged["exact"] <= 9 and flagged["short"] >= 270, flagged
    narrow, wide = fit_spread(8000, 0.005, 0.01), fit_spread(450, 0.005, 0.01)
    assert wide[0] < narrow[0] < 0.005 < narrow[1] < wide[1] and wide[1] > 0.012, (narrow, wide)
    assert abs(top_share_threshold(rng.normal(size=200000), 0.005) - norm.isf(0.005)) < 0.05
