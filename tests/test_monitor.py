"""``python -m pipelines.monitor``: a real process comparing real Parquet/CSV files; exit 3 on drift, 0 without, 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd

from tests.conftest import ROOT, child_env


def table(seed: int, n: int = 3000, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "amount": rng.normal(size=n) + shift,
        "latency": rng.exponential(2.0, size=n),
        "score": rng.uniform(size=n),
        "merchant": rng.choice(["a", "b"], size=n),  # not numeric: left out
    })  # fmt: skip


def monitor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.monitor", *args], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)


def test_a_shift_of_0_3_is_flagged_and_a_fresh_sample_is_not(tmp_path):
    table(0).to_parquet(tmp_path / "reference.parquet")
    table(1).to_csv(tmp_path / "same.csv", index=False)
    shifted = table(2, shift=0.3)
    shifted.loc[:9, "amount"] = np.nan  # missing values are left out, and counted
    shifted.to_parquet(tmp_path / "shifted.parquet")

    same = monitor(str(tmp_path / "reference.parquet"), str(tmp_path / "same.csv"), "--json", str(tmp_path / "same.json"))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "0 of 3 feature(s) drifted" in same.stdout
    report = json.loads((tmp_path / "same.json").read_text())
    assert [f["feature"] for f in report["features"]] == ["amount", "latency", "score"] and report["drifted"] == []
    assert all(f["psi"] < 0.05 and f["ks_pvalue"] > 0.001 for f in report["features"]), report

    drift = monitor(str(tmp_path / "reference.parquet"), str(tmp_path / "shifted.parquet"), "--json", str(tmp_path / "shifted.json"))
    assert drift.returncode == 3, drift.stdout + drift.stderr
    assert "1 of 3 feature(s) drifted: amount" in drift.stdout and drift.stdout.startswith("DRIFT amount: psi ")
    amount = json.loads((tmp_path / "shifted.json").read_text())["features"][0]
    assert amount["drifted"] and amount["ks_pvalue"] < 1e-6 and amount["window_missing"] == 10 and amount["window_count"] == 2990


def test_bad_input_exits_2_naming_it(tmp_path):
    table(0).to_parquet(tmp_path / "reference.parquet")
    cases = [
        ([str(tmp_path / "reference.parquet"), str(tmp_path / "missing.csv")], "missing.csv: no such file"),
        ([str(tmp_path / "reference.parquet"), str(tmp_path / "reference.parquet"), "--columns", "amount,ammount"],
         "column 'ammount': missing from the reference"),
        ([str(tmp_path / "reference.parquet"), str(tmp_path / "reference.parquet"), "--columns", "merchant"],
         "column 'merchant': expected numbers in the reference; got dtype"),
        ([str(tmp_path / "reference.parquet"), str(tmp_path / "x.txt")], "x.txt: expected a .parquet, .pq, .csv file"),
    ]  # fmt: skip
    for args, message in cases:
        result = monitor(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.returncode, result.stderr[-1000:])
