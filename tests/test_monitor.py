"""``python -m pipelines.monitor``: a real process comparing real Parquet/CSV files; exit 3 on drift, 0 without, 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT, child_env
from tests.processes import run_child


def table(seed: int, n: int = 3000, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "amount": rng.normal(size=n) + shift,
        "latency": rng.exponential(2.0, size=n),
        "score": rng.uniform(size=n),
        "merchant": rng.choice(["a", "b"], size=n),  # not numeric: left out
    })  # fmt: skip


def monitor(*args: str) -> subprocess.CompletedProcess:
    return run_child([sys.executable, "-m", "pipelines.monitor", *args], 120, cwd=ROOT, env=child_env())


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
    """The real process: a missing file and an unknown option, each one paragraph and exit status 2."""
    table(0).to_parquet(tmp_path / "reference.parquet")
    cases = [
        ([str(tmp_path / "reference.parquet"), str(tmp_path / "missing.csv")], "missing.csv: no such file"),
        ([str(tmp_path / "reference.parquet"), str(tmp_path / "reference.parquet"), "--psi-treshold", "0.3"], "did you mean '--psi_threshold'"),
    ]  # fmt: skip
    for args, message in cases:
        result = monitor(*args)
        assert result.returncode == 2 and message in " ".join(result.stderr.split()), (args, result.returncode, result.stderr[-1000:])
        assert "usage:" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def write_csv(name: str, edit=None, text: str | None = None, encoding: str = "utf-8"):
    """A ``make(folder)`` writing the window table ``name`` (``table(1)`` edited), or ``text`` as it is."""

    def make(folder: Path) -> None:
        if text is not None:
            (folder / name).write_text(text)
            return
        frame = table(1, n=50)
        if edit is not None:
            frame = edit(frame)
        if name.endswith(".parquet"):
            frame.to_parquet(folder / name)
        else:
            (folder / name).write_bytes(frame.to_csv(index=False).encode(encoding))

    return make


def cell(column: str, row: int, value):
    """Set 1-based data ``row`` of ``column`` (as text when ``value`` is text)."""

    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame[column] = frame[column].astype(object) if isinstance(value, str) else frame[column]
        frame.loc[row - 1, column] = value
        return frame

    return edit


BAD = [
    ("missing-column", write_csv("w.csv", lambda f: f.drop(columns="latency")), [], ("w.csv", "column 'latency' is missing", "its columns are")),
    ("column-typo", write_csv("w.csv"), ["--columns", "amount,ammount"], ("column 'ammount' is missing", "did you mean 'amount'")),
    ("all-missing", write_csv("w.csv", lambda f: f.assign(score=np.nan)), [], ("w.csv", "'score' has 0 value(s)", "50 missing", "at least 2")),
    ("text-in-numeric", write_csv("w.csv", cell("latency", 5, "fast")), [], ("w.csv", "'latency' should hold numbers", "row 5", "'fast'")),
    ("inf", write_csv("w.csv", cell("amount", 3, np.inf)), [], ("w.csv", "'amount' holds inf at row 3", "finite")),
    ("inf-parquet", write_csv("w.parquet", cell("score", 7, -np.inf)), [], ("w.parquet", "'score' holds inf at row 7")),
    ("empty-file", write_csv("w.csv", text=""), [], ("w.csv", "empty (0 bytes)")),
    ("header-only", write_csv("w.csv", text="amount,latency,score,merchant\n"), [], ("w.csv", "no data rows")),
    ("duplicate-header", write_csv("w.csv", lambda f: f.rename(columns={"score": "amount"})), [], ("w.csv", "'amount' 2 times")),
    ("latin-1", write_csv("w.csv", cell("merchant", 9, "café"), encoding="latin-1"), [], ("w.csv", "line 10 (data row 9)", "'merchant'", "not utf-8")),
    ("not-parquet", write_csv("w.parquet", text="not parquet"), [], ("w.parquet", "not a readable .parquet")),
    ("wrong-suffix", write_csv("w.txt", text="a\n1\n"), [], ("w.txt", "expected a .parquet, .pq, .csv file")),
    ("non-numeric-columns-option", write_csv("w.csv"), ["--columns", "merchant"], ("reference.parquet", "'merchant' should hold numbers")),
    ("empty-columns-option", write_csv("w.csv"), ["--columns", ","], ("--columns", "names no column")),
    ("ks-alpha-out-of-range", write_csv("w.csv"), ["--ks_alpha", "2"], ("--ks_alpha in (0, 1)", "got 0.2, 2.0")),
    ("psi-threshold-nan", write_csv("w.csv"), ["--psi_threshold", "nan"], ("--psi_threshold must be > 0",)),
    ("json-folder-missing", write_csv("w.csv"), ["--json", "{tmp}/no/such/report.json"], ("--json", "does not exist")),
    ("misspelt-option", write_csv("w.csv"), ["--kss-alpha", "0.01"], ("unrecognized arguments", "did you mean '--ks_alpha'")),
    # trial finding: these were tracebacks (exit 1) after the verdict, and --json onto a folder left a temporary file
    ("json-is-a-folder", write_csv("w.csv"), ["--json", "{tmp}"], ("--json", "is a folder")),
    ("report-is-a-file", write_csv("w.csv"), ["--report", "{tmp}/reference.parquet"], ("--report", "is a file; expected a folder")),
    ("report-under-a-file", write_csv("w.csv"), ["--report", "{tmp}/reference.parquet/reports"], ("--report", "is a file, so nothing can be written under it")),
    # trial finding: --json onto the window (the request log) or the reference replaced it with the report, exit 0
    ("json-is-the-window", write_csv("w.csv"), ["--json", "{tmp}/w.csv"], ("--json", "w.csv", "is an input of this command")),
    ("json-is-the-reference", write_csv("w.csv"), ["--json", "{tmp}/reference.parquet"], ("--json", "is an input of this command")),
]


@pytest.mark.parametrize(("make", "options", "expect"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_window_or_option_is_refused_with_one_paragraph_and_nothing_written(tmp_path, capsys, make, options, expect):
    from pipelines.monitor import main

    table(0, n=200).to_parquet(tmp_path / "reference.parquet")
    make(tmp_path)
    window = next(p for p in tmp_path.iterdir() if p.name.startswith("w."))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    json_out = tmp_path / "report.json"
    args = [str(tmp_path / "reference.parquet"), str(window), *options] + ([] if "--json" in options else ["--json", str(json_out)])
    capsys.readouterr()
    try:
        status = main(args)
    except SystemExit as stop:
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and "usage:" not in err and "Traceback" not in err, err
    flat = " ".join(err.split()).lower()
    for expected in expect:
        assert expected.lower() in flat, f"{expected!r} not in {err}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "a refused command wrote a file"


def test_a_small_calm_window_is_not_called_drift_but_a_small_moved_one_is():
    """Trial finding: 30 calm rows had 9 of 37 features flagged by PSI alone (KS p 0.1-0.99), and
    retrain --when drift trained. PSI now also needs its chi-square p-value below the per-feature alpha."""
    import numpy as np
    import pandas as pd

    from pipelines.drift import compare, psi

    rng = np.random.default_rng(7)
    features = [f"f{i}" for i in range(20)]
    reference = pd.DataFrame(rng.normal(size=(5000, 20)), columns=features)
    calm = pd.DataFrame(rng.normal(size=(30, 20)), columns=features)
    assert sum(psi(reference[f].to_numpy(), calm[f].to_numpy()) >= 0.2 for f in features) >= 5, "PSI alone would flag these"
    assert [r.feature for r in compare(reference, calm) if r.drifted] == []
    moved = calm.copy()
    moved["f3"] += 3.0
    assert [r.feature for r in compare(reference, moved) if r.drifted] == ["f3"]
    big = pd.DataFrame(rng.normal(size=(20000, 20)), columns=features)
    big["f5"] = big["f5"] * 1.5  # a wider spread: PSI about 0.1-0.2 on a large window is significant and still judged by the threshold
    assert all(r.psi_pvalue < 1e-6 for r in compare(reference, big) if r.feature == "f5")


def test_a_window_in_other_units_is_refused_but_a_large_real_shift_is_still_drift(tmp_path, capsys):
    """Amounts in cents against a reference in units, and a window whose features were renamed away, exit 2 naming the
    columns and writing nothing; the same data moved by 3 standard deviations (or spread 3x wider) exits 3."""
    from pipelines.monitor import main

    table(0).to_parquet(tmp_path / "reference.parquet")
    cents = table(1)
    cents["amount"] *= 100
    cents.to_csv(tmp_path / "cents.csv", index=False)
    table(1).rename(columns={"amount": "amt", "latency": "lat"}).to_csv(tmp_path / "renamed.csv", index=False)
    moved = table(2, shift=3.0)
    moved["latency"] *= 3
    moved.to_csv(tmp_path / "moved.csv", index=False)
    reference, out = str(tmp_path / "reference.parquet"), tmp_path / "out.json"

    assert main([reference, str(tmp_path / "cents.csv"), "--json", str(out)]) == 2
    refused = " ".join(capsys.readouterr().err.split())
    assert "cents.csv: 1 of 3 feature(s) are not in the units of" in refused and "'amount': median" in refused and "not drift" in refused, refused
    assert main([reference, str(tmp_path / "renamed.csv"), "--json", str(out)]) == 2
    assert "renamed.csv: 2 of the 3 features of" in " ".join(capsys.readouterr().err.split())
    assert not out.exists(), "a refused window writes nothing"
    assert main([reference, str(tmp_path / "moved.csv"), "--json", str(out)]) == 3
    assert json.loads(out.read_text())["drifted"] == ["amount", "latency"]


def test_json_replaces_an_earlier_report_and_refuses_any_other_file(tmp_path, capsys):
    """A nightly check rewrites its ``--json``; a file that is not one of its reports is never replaced."""
    from pipelines.monitor import main

    table(0, n=300).to_parquet(tmp_path / "reference.parquet")
    table(1, n=300).to_csv(tmp_path / "window.csv", index=False)
    report, notes = tmp_path / "check.json", tmp_path / "notes.json"
    notes.write_text('{"owner": "fraud team"}')
    args = [str(tmp_path / "reference.parquet"), str(tmp_path / "window.csv"), "--json"]
    assert main([*args, str(report)]) == 0
    first = json.loads(report.read_text())
    assert main([*args, str(report)]) == 0 and json.loads(report.read_text())["written_at"] >= first["written_at"]
    with pytest.raises(SystemExit) as stop:
        main([*args, str(notes)])
    assert stop.value.code == 2 and "is not an earlier report of this command" in capsys.readouterr().err
    assert notes.read_text() == '{"owner": "fraud team"}'
