"""Evaluation under real DDP (2 CPU processes, gloo): every validation and test sample is scored exactly once.

Lightning's default ``DistributedSampler`` pads a split so that each process gets as many samples as the others
(an odd test split of 311 rows was scored as 312); :class:`pipelines.data.UnpaddedDistributedSampler` does not.
The splits here are odd on purpose, and the test metrics of the 2-process run must be those of one process.
Healthcare's real DDP test (``tests/test_platform.py``) checks the same on its 2-process run.
"""

from __future__ import annotations

import json

import pytest

from pipelines.domain_registry import get_domain
from tests.conftest import copy_run, only_run, run_pipeline, run_pipeline_process

#: odd validation and test splits (sizes measured: finance 187/311, autonomous 99/99, media 13/13)
ODD_SPLITS = {
    "finance": ("--data.synthetic_rows=1209",),
    "autonomous": ("--data.sim_vehicles=61",),
    "media": ("--data.synthetic_samples=131",),
}
#: one training step, whole validation and test splits
ONE_STEP = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1.0", "--trainer.limit_test_batches=1.0",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false")  # fmt: skip
DDP = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")


# slow (~40 s each on a quiet 2-core machine, ~80 s loaded: over the default suite's budget; run with
# `python -m benchmarks.slow_checks -k two_process_evaluation`): healthcare's real DDP test (tests/test_platform.py,
# 207 samples, also slow: `python -m benchmarks.slow_checks -k two_process_ddp_on_cpu`) covers the shared sampler;
# these cover each other domain's loaders
@pytest.mark.slow
@pytest.mark.parametrize("domain", sorted(ODD_SPLITS))
def test_two_process_evaluation_scores_each_sample_once_and_matches_one_process(domain, runs_dir, tmp_path):
    counts = tmp_path / "counts"
    result = run_pipeline_process(
        domain, *get_domain(domain).test_args, *ODD_SPLITS[domain], *ONE_STEP, *DDP, "--runs_dir", str(runs_dir),
        "--trainer.callbacks+=tests.helpers.CountEvaluatedRows", f"--trainer.callbacks.folder={counts}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((counts / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for stage in ("val", "test"):
        size = ranks[0][stage][1]
        assert size % 2 == 1, f"{stage}: {size} samples; the check needs an odd split (2 processes)"
        scored = [rank[stage][0] for rank in ranks]
        assert sum(scored) == size and max(scored) - min(scored) <= 1, f"{stage}: the processes scored {scored} of {size} samples"

    run = only_run(runs_dir, domain)
    two_processes = json.loads((run / "summary.json").read_text())["test"]
    run_pipeline(domain, "test", "--runs_dir", str(runs_dir), "--run_id", run.name, "--ckpt_path", "best", *ONE_STEP[3:], "--trainer.accelerator", "cpu", "--trainer.devices", "1")
    one_process = json.loads((run / "summary.json").read_text())["test"]
    # every metric, the losses included (pipelines/evaluation_means.py: a mean over the samples, not over the processes' means)
    assert two_processes.keys() == one_process.keys() and two_processes
    assert two_processes == pytest.approx(one_process, rel=1e-5, abs=1e-6)


def test_predict_with_several_processes_is_refused_before_anything_is_written(tiny_run, tmp_path, capsys):
    """Under DDP each process wrote its share of the rows to a ``predictions.rankN.csv`` of its own: predict runs in one process."""
    runs = tmp_path / "runs"
    run = copy_run(tiny_run("finance"), runs)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    for asked in (("--trainer.devices", "2", "--trainer.strategy", "ddp"), ("--trainer.devices", "1", "--trainer.num_nodes", "2")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_pipeline("finance", "predict", "--ckpt_path", "best", "--run_id", run.name, "--runs_dir", str(runs), "--trainer.accelerator", "cpu", *asked)
        err = " ".join(capsys.readouterr().err.split())
        assert exit_info.value.code == 2, err[-2000:]
        assert "predict runs in one process, but the trainer options ask for 2" in err and "--trainer.devices 1" in err, err[-2000:]
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before, asked
    # devices left to auto: one process, one predictions file
    run_pipeline("finance", "predict", "--ckpt_path", "best", "--run_id", run.name, "--runs_dir", str(runs))
    assert [p.name for p in run.glob("predictions*.csv")] == ["predictions.csv"]


def test_a_rank_that_fails_after_the_last_collective_fails_the_command(runs_dir):
    """Rank 1 fails when the test ends, after the last collective: rank zero had nothing left to wait for and the
    command exited 0; every rank now meets once more when the command ends."""
    result = run_pipeline_process(
        "finance", *get_domain("finance").test_args, *ONE_STEP, *DDP, "--runs_dir", str(runs_dir), "--trainer.callbacks+=tests.helpers.FailOnRank",
    )  # fmt: skip
    assert result.returncode != 0 and "FailOnRank: rank 1 fails at the end of the test" in result.stderr, result.stderr[-3000:]
