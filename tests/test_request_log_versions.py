"""One rule for "whose records are these?" in a request log, worded by each of its three users: the alert-budget
check (scores), the drift monitor (features) and retraining's drift gate (the champion's records)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipelines.errors import InputError
from pipelines.monitor import check_window_versions
from pipelines.monitor_budget import Budget, check_versions
from pipelines.request_log import version_problem, window_versions
from pipelines.retrain_gate import champion_records


def log(*versions: str) -> pd.DataFrame:
    return pd.DataFrame({"version": list(versions), "x0": [float(i) for i in range(len(versions))]})


def test_version_problem_names_several_versions_or_another_one():
    assert window_versions(pd.DataFrame({"x0": [1.0]})) == []  # a table: no versions, nothing to refuse
    assert version_problem(pd.DataFrame({"x0": [1.0]}), "v1", None) is None
    assert version_problem(log("v2", "v1", "v2"), None, None) == ("several", ["v1", "v2"])
    assert version_problem(log("v2", "v1"), "v1", "v1") is None  # the records were picked with --model_version
    assert version_problem(log("v2", "v2"), "v1", None) == ("other", ["v2"])
    assert version_problem(log("v1", "v1"), "v1", None) is None
    assert version_problem(log("v2"), None, None) is None  # one version, the compared model's unknown (a checkpoint)


def test_budget_and_drift_checks_refuse_with_their_own_words(tmp_path):
    budget = Budget(path="bundle", kind="bundle", rate=0.01, threshold=1.0, record=None, alerts_at_budget=False, version="v1")
    with pytest.raises(InputError, match=r"scores of several model versions \['v1', 'v2'\]; pick the one bundle is with --model_version"):
        check_versions(budget, log("v1", "v2"), "requests.jsonl", None)
    with pytest.raises(InputError, match=r"scores come from model version \['v2'\], not from bundle \(version 'v1'\)"):
        check_versions(budget, log("v2"), "requests.jsonl", None)
    check_versions(budget, log("v1", "v2"), "requests.jsonl", "v1")  # chosen: the caller filtered the records

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "metadata.json").write_text(json.dumps({"domain": "finance", "model_version": "v1"}))
    with pytest.raises(InputError, match="records of several model versions"):
        check_window_versions(log("v1", "v2"), str(bundle), None, "requests.jsonl")
    with pytest.raises(InputError, match="answered by model version 'v2', not by .*version 'v1'.*change of model, not of the data"):
        check_window_versions(log("v2"), str(bundle), None, "requests.jsonl")
    check_window_versions(log("v1"), str(bundle), None, "requests.jsonl")


def test_drift_gate_keeps_the_champions_records_and_refuses_a_log_without_them(capsys):
    kept = champion_records(log("v1", "v2", "v2"), "v2", "requests.jsonl")
    assert list(kept["version"]) == ["v2", "v2"] and list(kept["x0"]) == [1.0, 2.0]
    assert "2 of 3 records answered by champion v2; the others (['v1'])" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"no records answered by champion v3 \(versions in the window: \['v1', 'v2'\]\)"):
        champion_records(log("v1", "v2"), "v3", "requests.jsonl")
    table = pd.DataFrame({"x0": [1.0, 2.0]})
    assert champion_records(table, "v1", "table.csv") is table
