"""Autonomous ``--data.streaming true``: a real ``pipelines.run autonomous fit`` child process sent SIGKILL or SIGTERM
while its cache is being built (its temporary folder exists and holds bytes) leaves no folder that looks complete
but is not, and the same command run again builds the cache and trains: its cache files equal, byte for byte, those
of an undisturbed run, and so do its metrics.

Marked ``slow`` (about 20 s of child processes per signal on a quiet 2-core machine, minutes under load); the
benchmark command ``python -m benchmarks.stop_caches`` runs the same check (``benchmarks.stop_caches.check_stops``)
and prints it as a table.
"""

from __future__ import annotations

import pytest

from benchmarks.stop_caches import check_stops, verdict


@pytest.mark.slow
def test_a_cache_build_stopped_by_a_signal_leaves_nothing_complete_looking_and_the_rerun_matches_an_undisturbed_run(tmp_path):
    result = check_stops(tmp_path, ["KILL", "TERM"])
    reference = result["reference"]
    assert len(reference["caches"]) == 1 and any(key.startswith("train/") for row in reference["metrics"] for key in row), reference["metrics"]
    for name, stop in result["stops"].items():
        stopped = stop["stopped"]
        assert stopped["returncode"] != 0 and stopped["bytes_written_at_signal"] > 0, (name, stopped)
        # the signal landed inside the build: nothing under a final name
        assert stop["after_stop"]["complete_looking"] == {}, (name, stop["after_stop"])
        # SIGKILL leaves the temporary folder (the next build removes it); SIGTERM exits 143 through the clean-up
        assert len(stop["after_stop"]["partial"]) == (1 if name == "KILL" else 0), (name, stop["after_stop"])
        rerun = stop["rerun"]
        assert rerun["returncode"] == 0, (name, rerun["stderr"])
        assert all(problem is None for problem in rerun["state"]["complete_looking"].values()), (name, rerun["state"])
        assert all(verdict(result, name).values()), (name, verdict(result, name))
