"""Sweeps (``python -m pipelines.sweep``) with real Optuna studies, real runner processes and real files.

Every trial is a tiny finance run in its own child process. Two sweep commands share one SQLite study
at once; a sweep with two in-process workers records a trial the runner refuses (exit 2) as failed and
goes on; a sweep is SIGKILLed mid-trial (its trials' processes die with it) and the same command then
finishes the study, retrying the lost trials with their parameters. Bad space files are refused with
exit 2 before anything is written.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from pipelines.domain_registry import get_domain  # noqa: E402
from pipelines.sweep import build_parser, main as sweep_main  # noqa: E402
from tests.conftest import ROOT, child_env  # noqa: E402
from tests.processes import alive, child_process, run_child  # noqa: E402

SPEC = get_domain("finance")
TINY = [*SPEC.test_args, "--trainer.max_epochs=2"]
DEPLOY = ROOT / "deploy"


def write_space(folder: Path, name: str, space: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def sweep_command(tmp: Path, space: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.sweep", "finance", f"--space={space}", f"--trials={trials}",
            f"--sweeps_dir={tmp / 'sweeps'}", f"--runs_dir={tmp / 'runs'}", *extra, *TINY]  # fmt: skip


def run_sweep(command: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return run_child(command, timeout, cwd=ROOT, env=child_env())


def load(tmp: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / 'sweeps' / 'finance' / name / 'study.db'}")


def by_outcome(study: optuna.Study) -> dict[str, list]:
    outcomes: dict[str, list] = {}
    for trial in study.get_trials():
        outcomes.setdefault(trial.user_attrs.get("outcome", "lost"), []).append(trial)
    return outcomes


@pytest.mark.parametrize(
    "space, expected",
    [
        ("model.lr: {low: 0.1, hi: 1}", "model.lr: unknown key 'hi' (did you mean 'high'?)"),
        ("model.lr: {low: 1, high: 0.1}", "low (1) must be smaller than high (0.1)"),
        ("model.lr: {low: 0, high: 1, log: true}", "a log scale needs low > 0"),
        ("model.lr: {choices: []}", "choices must be a non-empty list"),
        ("lr: {low: 0.1, high: 1}", "a sweep searches runner options under model.*, data.*, trainer.*"),
        ("run_id: {choices: [a]}", "a sweep searches runner options"),
        ("model.lr: [0.1, 1", "not valid YAML (line 2"),
        ("model.lrr: {low: 0.001, high: 0.1}", "model.lrr is not an option of finance (did you mean 'model.lr'"),
        ("model.lr: {low: 0.001, high: 0.01, log: true}\nmodel.lr: {low: 0.1, high: 0.5}", "key 'model.lr' appears twice (lines 1 and 2)"),
        ("model.lr: {low: 0.001, high: 0.01, low: 0.1}", "key 'low' appears twice"),
        ("model.lr: {low: .nan, high: 0.01}", "low must be a finite number, got nan"),
        ("model.lr: {low: 0.001, high: .inf}", "high must be a finite number, got inf"),
    ],
)
def test_bad_space_files_are_refused_before_anything_runs(tmp_path, capsys, space, expected):
    path = tmp_path / "space.yaml"
    path.write_text(space + "\n")
    code = sweep_main(["finance", f"--space={path}", "--trials=3", f"--sweeps_dir={tmp_path / 'sweeps'}", f"--runs_dir={tmp_path / 'runs'}", *TINY])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and expected in " ".join(err.split()), err
    assert "Traceback" not in err
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "runs").exists()


def test_bad_sweep_options_are_refused(tmp_path, capsys):
    space = write_space(tmp_path, "space", {"model.lr": {"low": 0.001, "high": 0.01}})
    assert sweep_main(["finance", f"--space={space}", "--trials=0"]) == 2
    assert "--trials must be at least 1" in capsys.readouterr().err
    assert sweep_main(["finance", f"--space={space}", "--trials=2", "--run_id=x"]) == 2
    assert "--run_id is set by the sweep" in capsys.readouterr().err
    assert sweep_main(["finance", f"--space={space}", "--trials=2", "--sampler=grid"]) == 2
    assert "--sampler grid needs `choices`" in capsys.readouterr().err


def test_two_sweep_processes_share_one_study_and_best_yaml_is_a_runner_config(tmp_path):
    """Two `pipelines.sweep` commands at once on one SQLite study: 2 trials in all, run at the same time."""
    from tests.wandb_offline import records, run_file

    space = write_space(tmp_path, "shared", {"model.lr": {"low": 0.0005, "high": 0.005, "log": True}, "model.latent_dim": {"low": 4, "high": 12, "step": 4}})
    command = sweep_command(tmp_path, space, 2, "--pruner=none", "--no_wandb")
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(child_process(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for _ in range(2)]
        results = [(w.wait(timeout=400), *w.communicate()) for w in workers]
    for code, out, err in results:
        assert code == 0, err[-3000:]
    study = load(tmp_path, "shared")
    complete = by_outcome(study)["complete"]
    assert len(study.get_trials()) == 2 and len(complete) == 2
    assert len({t.user_attrs["worker"] for t in complete}) == 2, "each command should have run one trial"
    first, second = sorted(complete, key=lambda t: t.datetime_start)
    assert second.datetime_start < first.datetime_complete, "the two trials did not run at the same time"
    for trial in complete:  # each trial is a normal run folder, in the sweep's W&B group
        run_dir = Path(trial.user_attrs["run_dir"])
        assert (run_dir / "checkpoints" / "best.ckpt").is_file() and "test" in yaml.safe_load((run_dir / "summary.json").read_text())
        run = next(r.run for r in records(run_file(run_dir)) if r.WhichOneof("record_type") == "run")
        assert run.run_group == "shared"
    best = tmp_path / "sweeps" / "finance" / "shared" / "best.yaml"
    out = io.StringIO()
    from pipelines.run import main as run_main

    with contextlib.redirect_stdout(out):
        with pytest.raises(SystemExit) as stop:
            run_main(["finance", "--config", str(best), "--print_config"])
    assert stop.value.code in (0, None)
    resolved = yaml.safe_load(out.getvalue())
    assert resolved["model"]["lr"] == pytest.approx(study.best_params["model.lr"])
    assert resolved["model"]["latent_dim"] == study.best_params["model.latent_dim"]
    assert resolved.get("run_id") is None and resolved["trainer"]["callbacks"] is None
    assert f"best trial {study.best_trial.number}" in "".join(r[1] for r in results)
    assert "# domain: finance\n" in best.read_text()  # another domain's runner names it (tests/test_trial_messages.py)


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    """Grid over two learning rates, one the runner refuses (exit 2)."""
    space = write_space(tmp_path, "grid", {"model.lr": {"choices": [0.002, -1.0]}, "model.hidden_dims": {"choices": [[32, 16]]}})
    result = run_sweep(sweep_command(tmp_path, space, 2, "--sampler=grid", "--pruner=median"))
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path, "grid")
    outcomes = by_outcome(study)
    [failed], [complete] = outcomes["failed"], outcomes["complete"]
    assert failed.state == optuna.trial.TrialState.FAIL and failed.params["model.lr"] == -1.0
    assert failed.user_attrs["exit_code"] == 2 and "lr" in failed.user_attrs["error"]
    assert study.best_trial.number == complete.number and complete.params["model.hidden_dims"] == "[32, 16]"
    assert len(complete.intermediate_values) == 2, "the pruning callback reports after each validation run"
    folder = tmp_path / "sweeps" / "finance" / "grid"
    assert {p.name for p in (folder / "plots").glob("*.png")} >= {"optimization_history.png", "intermediate_values.png"}
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["model"]["hidden_dims"] == [32, 16] and best["model"]["lr"] == 0.002
    assert list((folder / "wandb").glob("offline-run-*-grid-study"))
    assert f"trial {failed.number} FAIL" in result.stderr and "1 complete, 0 pruned, 1 failed" in result.stderr


def training_trials(runs: Path, prefix: str, count: int, process: subprocess.Popen, timeout: float = 300) -> list[int]:
    """Wait until ``count`` trials' runners hold their run folder's lock (they are training); their pids."""
    deadline = time.time() + timeout
    locks: list[Path] = []
    while time.time() < deadline and process.poll() is None:
        locks = [p for p in runs.glob(f"{prefix}-t*/.lock") if p.read_text().strip()]
        if len(locks) >= count:
            break
        time.sleep(0.2)
    assert process.poll() is None and len(locks) >= count, f"no {count} trial(s) training: {process.stderr.read()[-2000:] if process.stderr else ''}"
    return [int(lock.read_text().split()[1]) for lock in locks]


# Slow: 389 s on the shared 2-core machine under load ~14 (two sweep starts, four trial processes).
@pytest.mark.slow
def test_killed_sweep_resumes_and_loses_no_trial(tmp_path):
    space = write_space(tmp_path, "resume", {"model.lr": {"low": 0.0005, "high": 0.005, "log": True}})
    slow = ["--trainer.callbacks+=tests.helpers.PauseEachBatch", "--trainer.callbacks.seconds=1"]
    command = sweep_command(tmp_path, space, 2, "--workers=2", "--heartbeat_interval=1", "--pruner=none", "--no_wandb", *slow)
    runs = tmp_path / "runs" / "finance"
    with child_process(command, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as sweep:
        trainers = training_trials(runs, "resume", 2, sweep)
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
    time.sleep(3)
    assert not [pid for pid in trainers if alive(pid)], "a trial's runner outlived the killed sweep"
    killed = load(tmp_path, "resume").get_trials()
    assert [t.state for t in killed] and all(t.state == optuna.trial.TrialState.RUNNING for t in killed)

    result = run_sweep(command)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path, "resume")
    outcomes = by_outcome(study)
    assert len(outcomes["complete"]) == 2 and not outcomes.get("failed")
    lost = {t.number: t for t in outcomes["lost"]}
    assert set(lost) == {t.number for t in killed} and all(t.state == optuna.trial.TrialState.FAIL for t in lost.values())
    for trial in outcomes["complete"]:  # every lost trial was retried with its own parameters
        origin = trial.system_attrs.get("failed_trial")
        if origin is not None:
            assert trial.params == lost[origin].params
    assert {t.system_attrs.get("failed_trial") for t in outcomes["complete"]} >= set(lost)


# Slow: 75 s on a quiet 2-core machine (two sweeps, three trial processes of which one is frozen for ~40 s).
@pytest.mark.slow
def test_a_trial_failed_for_a_silent_heartbeat_while_it_ran_is_not_told_again(tmp_path):
    """Sweep A's trial 0 trains; sweep B (two workers) joins the study while trial 0 is alive, so it starts one
    trial of its own, no more (the study lacks one). Then A is frozen (SIGSTOP): its heartbeat falls silent, B
    fails trial 0 as stale and runs its retry (same parameters) before it ends: no trial is left WAITING
    (B used to end with the retry queued and never run, and started two trials for the one lacking). A, woken
    up, finds its trial's result already recorded as failed: it says so and exits 0 (Optuna's "Cannot tell a
    FAIL trial" crashed it before).

    The order is fixed by signals, not by timing: trial 0's runner is frozen too from the moment it trains
    until B's trial trains (so it cannot end first, however slow B's start), and A only after that."""
    space = write_space(tmp_path, "stale", {"model.lr": {"low": 0.0005, "high": 0.005, "log": True}})
    slow = ["--trainer.callbacks+=tests.helpers.PauseEachBatch", "--trainer.callbacks.seconds=0.5"]
    command = sweep_command(tmp_path, space, 2, "--heartbeat_interval=1", "--pruner=none", "--no_wandb", *slow)
    runs = tmp_path / "runs" / "finance"
    with child_process(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as first:
        (trial_zero,) = training_trials(runs, "stale", 1, first)
        os.killpg(trial_zero, signal.SIGSTOP)  # its own session (pipelines.child_run): A, not frozen, keeps its heartbeat
        try:
            with child_process([*command[: -len(TINY)], "--workers=2", *TINY], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as second:
                training_trials(runs, "stale", 2, second)  # B's own trial trains, trial 0 still RUNNING
                assert [t.state.name for t in load(tmp_path, "stale").trials] == ["RUNNING", "RUNNING"]
                first.send_signal(signal.SIGSTOP)
                out, err = second.communicate(timeout=400)
                assert second.returncode == 0, err[-3000:]
                assert "1 lost" in err, err[-3000:]
        finally:
            os.killpg(trial_zero, signal.SIGCONT)
            first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert "trial 0 ended (exit 0) after it had been recorded as failed" in " ".join(err.split())
    trials = load(tmp_path, "stale").trials
    shown = "; ".join(f"{t.number} {t.state.name} {t.user_attrs.get('outcome')} {t.system_attrs.get('failed_trial')}" for t in trials)
    assert all(t.state.is_finished() for t in trials), f"a trial left unfinished: {shown}"
    outcomes = by_outcome(load(tmp_path, "stale"))
    assert [t.number for t in outcomes["lost"]] == [0] and len(outcomes.get("complete", [])) >= 1, shown
    assert len(outcomes.get("complete", [])) + len(outcomes.get("failed", [])) == 2, f"B started more trials than the study lacked: {shown}"
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert retry.number == 2 and retry.params == trials[0].params and retry.user_attrs["outcome"] in ("complete", "failed"), shown
    assert Path(retry.user_attrs["run_dir"]).name == "stale-t0002"  # a new run folder, not trial 0's


# Slow: 268 s on the shared 2-core machine under load ~14 (two sweep starts, two trials with 2 s batches).
@pytest.mark.slow
def test_sigterm_stops_the_sweep_honestly_and_the_same_command_resumes_it(tmp_path):
    """SIGTERM: exit 143, the study and the running trial's last.ckpt are kept, the trial is retried."""
    space = write_space(tmp_path, "term", {"model.lr": {"low": 0.0005, "high": 0.005, "log": True}})
    slow = ["--trainer.callbacks+=tests.helpers.PauseEachBatch", "--trainer.callbacks.seconds=2"]
    command = sweep_command(tmp_path, space, 1, "--pruner=none", "--no_wandb", *slow)
    with child_process(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as sweep:
        training_trials(tmp_path / "runs" / "finance", "term", 1, sweep)
        log = tmp_path / "sweeps" / "finance" / "term" / "logs" / "trial-0000.log"
        deadline = time.time() + 300
        while time.time() < deadline and sweep.poll() is None and "Trainable params" not in log.read_text():  # the fit has started
            time.sleep(0.2)
        time.sleep(3)  # inside the first training batches (2 s each)
        sweep.send_signal(signal.SIGTERM)
        out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM after 0/1 trials; the same command continues it" in " ".join(err.split())
    assert "0 failed, 1 stopped, 0 lost, 1 waiting" in err  # the stopped trial is retried, not lost
    stopped = load(tmp_path, "term").get_trials()
    assert [t.state for t in stopped] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING] and stopped[0].user_attrs["outcome"] == "stopped"
    assert (Path(stopped[0].user_attrs["run_dir"]) / "checkpoints" / "last.ckpt").is_file()

    result = run_sweep(command)
    assert result.returncode == 0, result.stderr[-3000:]
    (complete,) = by_outcome(load(tmp_path, "term"))["complete"]
    assert complete.number == 1 and complete.params == stopped[0].params and complete.user_attrs["exit_code"] == 0
    assert Path(complete.user_attrs["run_dir"]) != Path(stopped[0].user_attrs["run_dir"])  # the retry has its own run folder


def test_deploy_examples_run_the_sweep_on_a_shared_storage():
    sbatch = DEPLOY / "sweep-slurm-array.sbatch"
    subprocess.run(["bash", "-n", str(sbatch)], check=True)
    assert os.access(sbatch, os.X_OK)
    text = sbatch.read_text()
    assert "#SBATCH --array=" in text and "#SBATCH --requeue" in text
    assert '-m pipelines.sweep "$DOMAIN"' in text and '--storage "$SWEEP_STORAGE"' in text
    assert "\n  2) " in text and "exit 2" in text
    documents = list(yaml.safe_load_all((DEPLOY / "k8s-sweep-indexed-job.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in documents}
    job, claim = kinds["Job"]["spec"], kinds["PersistentVolumeClaim"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] > 1
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "pipelines.sweep"]
    options, runner_args = build_parser().parse_known_args(container["args"])
    assert options.domain in ("healthcare", "autonomous", "finance", "media") and options.storage == "$(OPTUNA_STORAGE)"
    assert any(e["name"] == "OPTUNA_STORAGE" for e in container["env"]) and all(a.startswith("--") for a in runner_args)
    mount = container["volumeMounts"][0]["mountPath"]
    assert options.runs_dir.startswith(mount) and options.sweeps_dir.startswith(mount)
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert job["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for document in documents:
        kubernetes_validate.validate(document, "1.31", strict=True)


@pytest.mark.parametrize(
    "storage, expected",
    [
        ("notaurl", "--storage 'notaurl' is not a database URL"),
        ("sqlite:////no/such/folder/study.db", "the folder /no/such/folder of the SQLite file does not exist"),
        ("nosuchdb://host/db", "'nosuchdb' is not a database kind"),
        ("postgresql+nosuchdriver://u:secret@host/db", "is not a database kind"),
    ],
)
def test_a_bad_storage_url_is_refused_before_the_sweep_folder_is_made(tmp_path, capsys, storage, expected):
    space = write_space(tmp_path, "space", {"model.lr": {"low": 0.001, "high": 0.01}})
    code = sweep_main(["finance", f"--space={space}", "--trials=2", f"--storage={storage}", f"--sweeps_dir={tmp_path / 'sweeps'}", f"--runs_dir={tmp_path / 'runs'}", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and expected in " ".join(err.split()), err
    assert "Traceback" not in err and "secret" not in err
    assert not (tmp_path / "sweeps").exists()


def test_a_queued_retry_is_counted_as_waiting_and_is_always_started():
    """What the sweep counts on a real (in-memory) study: a trial lost while running elsewhere, its retry queued by
    Optuna's callback (WAITING), one complete trial. A command for 2 trials starts the retry; with the study full
    (2 finished) it still starts it, so that no retry is left WAITING (pipelines/sweep_counts.py)."""
    from pipelines.sweep_counts import count_trials, trials_to_start

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    distribution = {"model.lr": optuna.distributions.FloatDistribution(0.001, 0.01)}
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.5, params={"model.lr": 0.002}, distributions=distribution,
                                        user_attrs={"outcome": "complete"}))  # fmt: skip
    lost = optuna.create_trial(state=optuna.trial.TrialState.FAIL, params={"model.lr": 0.003}, distributions=distribution, user_attrs={"run_dir": "x"})
    study.add_trial(lost)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study.trials[1])
    counts = count_trials(study.trials)
    assert {k: counts[k] for k in ("complete", "finished", "lost", "running", "waiting")} == {"complete": 1, "finished": 1, "lost": 1, "running": 0, "waiting": 1}
    assert trials_to_start(counts, 2) == 1 and trials_to_start(counts, 1) == 1 and trials_to_start({**counts, "waiting": 0}, 1) == 0
    retry = study.ask()  # what the started trial is: the queued retry, with the lost trial's parameters
    assert retry.number == 2 and retry.params == {"model.lr": 0.003}
    assert count_trials(study.trials)["waiting"] == 0 and count_trials(study.trials)["running"] == 1


def test_workers_asking_at_once_never_claim_the_same_waiting_trial(tmp_path):
    """Eight threads ask a real SQLite study for a trial at once while eight retries wait, five times: each gets its
    own (pipelines/sweep_storage.py). With Optuna's plain RDBStorage two threads got the same trial in 3-4 of 5 rounds
    (SQLite ignores SELECT ... FOR UPDATE): the killed-sweep check then ran one retry twice and recorded it failed."""
    import threading

    from pipelines.sweep_trial import open_storage

    study = optuna.create_study(study_name="claims", storage=open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=60, grace_period=120))
    for _ in range(5):
        for x in range(8):
            study.enqueue_trial({"x": float(x)})
        start, numbers = threading.Barrier(8), []

        def ask() -> None:
            start.wait()
            numbers.append(study.ask().number)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(numbers)) == 8, f"a waiting trial was claimed twice: {sorted(numbers)}"
        for number in numbers:
            study.tell(number, 1.0)
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING))
