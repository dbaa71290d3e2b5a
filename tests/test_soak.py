"""The retraining soak test (``benchmarks/soak_retrain.py``), marked ``slow`` (``pytest -m slow``; also
``python -m benchmarks.soak_retrain``): a short form (3 nights) and the 30-night form on finance and healthcare.

Every night is a real ``python -m pipelines.retrain`` child on a rolling ``latest.npz``; faults are
real (here SIGKILL while the challenger is evaluated and a second call while one runs; the
corrupt file, the diverging run and the read-only registry are in tests/test_retrain_policy.py) and
after each night the soak asserts the registry verifies, the lock is free, the champion passes the
floors, the exit code is one the fault allows and no history or needed version was lost.
"""

from __future__ import annotations

import pytest

from benchmarks.soak_retrain import SCHEDULE, soak


@pytest.mark.slow  # 90 s of the default suite's 10 minutes; `python -m benchmarks.soak_retrain` runs the soak with every fault
def test_short_soak_survives_a_kill_in_evaluation_and_a_concurrent_call(tmp_path):
    result = soak(["finance"], nights=3, work=tmp_path, keep=2, schedule={2: "kill_eval", 3: "concurrent"}, echo=False)
    rows = result["rows"]
    assert rows[0]["fault"] == "none" and rows[0]["exit"] == 0
    assert rows[2]["fault"] == "concurrent" and rows[2]["landed"] == "second call exit 5"
    assert all(r["champion"] != "-" for r in rows), "the first night's champion stays in place through every fault"
    summary = result["summary"]["finance"]
    assert summary["final_exit"] in (0, 3, 4) and summary["faults"] >= 1


@pytest.mark.slow
def test_thirty_nights_on_finance_and_healthcare(tmp_path):
    result = soak(["finance", "healthcare"], nights=30, work=tmp_path, keep=5, echo=False)
    for domain, summary in result["summary"].items():
        assert summary["nights"] == 30 and summary["faults_survived"] == summary["faults"] >= len(SCHEDULE) - 4, (domain, summary)
