"""Scheduled retraining and the model registry, with real runs of the healthcare domain on tiny data.

One registry goes through a retraining life (module fixture, in this process to save interpreter
start-ups): first run promotes, same data -> nothing new, new data + warm start -> promoted, a
deliberately worse challenger (lr 0) -> kept champion. Copies of it are then rolled back, and
retrained by real child processes: a second concurrent retrain exits "locked", and the first is
SIGKILLed in the middle of writing its version (detected on the file system), after which the
registry is valid and the champion loads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.domain_registry import available_domains, get_domain
from pipelines.fingerprint import fingerprint
from pipelines.model_registry import TMP_PREFIX, ModelRegistry
from pipelines.registry_cli import main as registry_main
from pipelines.retrain import main as retrain_main
from pipelines.retrain_steps import ExitCode, resolve_config
from pipelines.selection import Selection, evaluation_metric_key
from tests.conftest import ROOT, child_env
from tests.processes import run_child

DEPLOY = ROOT / "deploy"
SPEC = get_domain("healthcare")
# the registry-wide tiny run, shrunk further: one epoch of one batch with the smallest ResNet. No
# augmentation: albumentations 2 draws from its own unseeded generator, so seed_everything does not make
# augmented runs reproducible.
TINY = [*SPEC.test_args, "--model.network=resnet10", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--data.augment=null"]
# a weak first champion (one step; still better than chance, or the sanity floor test/auroc>0.5 rejects it):
# the retrained model then beats it by far
WEAK = ["--model.lr=0.001"]
NEW_DATA = ["--data.synthetic_seed=1", "--data.synthetic_samples=192"]
MARGIN = "--margin=0.02"


def retrain(registry: Path, runs: Path, *args: str) -> int:
    return retrain_main(["healthcare", "--registry", str(registry), "--runs_dir", str(runs), MARGIN, *args])


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("retrain")
    registry, runs = root / "registry", root / "runs"
    steps: dict = {"registry": registry, "runs": runs}
    steps["first"] = retrain(registry, runs, *TINY, *WEAK)
    steps["versions_after_first"] = ModelRegistry(registry, "healthcare").versions()
    steps["same"] = retrain(registry, runs, *TINY, *WEAK)
    steps["versions_after_same"] = ModelRegistry(registry, "healthcare").versions()
    steps["better"] = retrain(registry, runs, "--warm_start", *TINY, *NEW_DATA, "--trainer.limit_train_batches=4", "--trainer.max_epochs=2")
    steps["worse"] = retrain(registry, runs, *TINY, *NEW_DATA, "--model.lr=0")
    steps["worse_again"] = retrain(registry, runs, *TINY, *NEW_DATA, "--model.lr=0")
    return steps


def history(registry: Path) -> list[dict]:
    return ModelRegistry(registry, "healthcare").history()


def wandb_run_kind(run_dir: Path) -> tuple[str, str]:
    from tests.wandb_offline import records, run_file

    run = next(r.run for r in records(run_file(run_dir)) if r.WhichOneof("record_type") == "run")
    return run.job_type, run.run_group


def check_champion_loads(registry: ModelRegistry) -> None:
    import torch

    model = registry.load_model()
    with torch.no_grad():
        logits = model(torch.zeros(2, 1, 32, 32))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_first_run_promotes(lifecycle):
    registry = ModelRegistry(lifecycle["registry"], "healthcare")
    assert lifecycle["first"] == ExitCode.PROMOTED
    assert lifecycle["versions_after_first"] == ["v0001"]
    row = history(lifecycle["registry"])[0]
    assert row["decision"] == "promoted" and row["challenger"]["version"] == "v0001" and row["champion"] == {"version": None}
    assert row["fingerprint"] and row["git_commit"] and Path(row["run_dir"], "checkpoints", "best.ckpt").is_file()
    pinned = registry.evaluation()
    assert pinned["data"]["synthetic_seed"] == 0 and pinned["data"]["synthetic_samples"] == 96
    folder = registry.version_dir("v0001")
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "checkpoint_extras.pt", "preprocessing.json", "config.yaml", "metadata.json", "SHA256SUMS"}
    assert json.loads((folder / "preprocessing.json").read_text())["class_names"] == ["normal", "benign", "malignant"]
    metadata = registry.metadata("v0001")
    assert metadata["metric"] == "test/auroc" and metadata["mode"] == "max" and metadata["score"] == row["challenger"]["score"]


def test_same_data_is_nothing_new(lifecycle):
    assert lifecycle["same"] == ExitCode.NOTHING_NEW
    assert lifecycle["versions_after_same"] == ["v0001"], "nothing may be trained or registered"
    first, same = history(lifecycle["registry"])[:2]
    assert same["decision"] == "nothing-new" and same["fingerprint"] == first["fingerprint"] and "run_dir" not in same


def test_new_data_with_a_better_model_is_promoted(lifecycle):
    registry = ModelRegistry(lifecycle["registry"], "healthcare")
    assert lifecycle["better"] == ExitCode.PROMOTED
    first, _, better = history(lifecycle["registry"])[:3]
    assert better["decision"] == "promoted" and better["challenger"]["version"] == "v0002" and better["warm_start"] == "v0001"
    assert better["fingerprint"] != first["fingerprint"]
    assert better["challenger"]["score"] > better["champion"]["score"] + 0.02
    # the champion re-scored on the fixed evaluation set gets exactly its score from when it was trained
    assert better["champion"]["version"] == "v0001"
    assert better["champion"]["score"] == pytest.approx(first["challenger"]["score"], abs=1e-6)
    assert registry.metadata("v0001")["evaluation"] == registry.metadata("v0002")["evaluation"] == registry.evaluation()["fingerprint"]
    record = registry.champion_record()
    assert record["version"] == "v0002" and record["previous"] == ["v0001"]
    # the attempt's runs share one W&B group per domain, with job types for training and evaluation
    assert wandb_run_kind(Path(better["run_dir"])) == ("retrain", "retrain-healthcare")
    assert wandb_run_kind(Path(better["champion"]["eval_run"])) == ("retrain-eval", "retrain-healthcare")


def test_worse_challenger_keeps_the_champion(lifecycle):
    registry = ModelRegistry(lifecycle["registry"], "healthcare")
    assert lifecycle["worse"] == ExitCode.KEPT_CHAMPION
    worse = history(lifecycle["registry"])[3]
    assert worse["decision"] == "rejected" and worse["challenger"]["version"] == "v0003" and worse["champion"]["version"] == "v0002"
    assert worse["challenger"]["score"] < worse["champion"]["score"]
    assert registry.champion() == "v0002" and registry.versions() == ["v0001", "v0002", "v0003"]
    assert registry.verify() == []
    check_champion_loads(registry)
    # the same rejected data against the same champion is not retrained by the next scheduled run
    assert lifecycle["worse_again"] == ExitCode.NOTHING_NEW
    again = history(lifecycle["registry"])[4]
    assert again["decision"] == "nothing-new" and again["fingerprint"] == worse["fingerprint"]


def test_registry_list_prints_the_history_table(lifecycle, capsys):
    assert registry_main(["healthcare", "list", "--registry", str(lifecycle["registry"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["time", "decision", "challenger"]
    decisions = [line.split()[2] for line in lines[2:7]]
    assert decisions == ["promoted", "nothing-new", "promoted", "rejected", "nothing-new"]
    assert "v0002*" in lines[4] and lines[-1].startswith("champion: v0002")
    assert registry_main(["healthcare", "show", "v0003", "--registry", str(lifecycle["registry"])]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v0003" and shown["champion"] is False


def test_rollback_restores_the_previous_champion(lifecycle, tmp_path, capsys):
    copy = tmp_path / "registry"
    shutil.copytree(lifecycle["registry"], copy)
    registry = ModelRegistry(copy, "healthcare")
    assert registry_main(["healthcare", "rollback", "--registry", str(copy)]) == 0
    assert registry.champion() == "v0001"
    weights, expected = registry.load_weights(), registry.load_weights("v0001")
    assert weights.keys() == expected.keys() and all((weights[k] == expected[k]).all() for k in weights)
    check_champion_loads(registry)
    assert registry_main(["healthcare", "rollback", "--registry", str(copy)]) == 2, "no champion before v0001: bad input"
    assert "no previous champion" in capsys.readouterr().err
    assert registry_main(["healthcare", "promote", "v0003", "--registry", str(copy)]) == 0
    assert registry.champion() == "v0003"
    assert registry_main(["healthcare", "promote", "v0009", "--registry", str(copy)]) == 2, "an unknown version is bad input"
    assert [row["decision"] for row in registry.history()[-2:]] == ["manual-rollback", "manual-promote"]


def test_concurrent_retrain_is_locked_and_a_kill_during_promotion_keeps_the_registry_valid(lifecycle, tmp_path, child_processes):
    copy, runs = tmp_path / "registry", tmp_path / "runs"
    shutil.copytree(lifecycle["registry"], copy)
    registry = ModelRegistry(copy, "healthcare")
    command = [
        sys.executable, "-m", "pipelines.retrain", "healthcare", "--registry", str(copy), "--runs_dir", str(runs),
        *TINY, "--data.synthetic_seed=3", "--trainer.logger=false", "--margin=-1",  # any challenger is promoted
    ]  # fmt: skip
    log = open(tmp_path / "first.log", "w+")  # a file, not a pipe: a full pipe would stall the child
    first = child_processes.start(command, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        lock_file = copy / "healthcare" / ".lock"
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            if lock_file.is_file() and f'"pid": {first.pid}' in lock_file.read_text():
                break
            time.sleep(0.05)
        assert first.poll() is None, f"the first retrain ended early: {(tmp_path / 'first.log').read_text()[-3000:]}"

        started = time.time()
        second = run_child(command, 120, cwd=ROOT, env=child_env())
        assert second.returncode == ExitCode.LOCKED, second.stderr[-3000:]
        assert "locked" in second.stderr and str(lock_file) in second.stderr and f'"pid": {first.pid}' in second.stderr
        assert time.time() - started < 60, "a locked retrain must exit at once"

        # SIGKILL the first one as soon as it starts writing its version (the promotion step)
        deadline = time.time() + 400
        partial: list[Path] = []
        while time.time() < deadline and first.poll() is None:
            if registry.versions_dir.is_dir():
                partial = [p for p in registry.versions_dir.iterdir() if p.name.startswith(TMP_PREFIX)]
                if partial:
                    first.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.002)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        log.close()
    assert partial, f"the retrain never reached the promotion step: {(tmp_path / 'first.log').read_text()[-3000:]}"
    assert first.returncode == -signal.SIGKILL
    assert any(p.exists() for p in partial), "the kill must land while the version is being written"
    assert "[retrain] promoted: test/auroc" in (tmp_path / "first.log").read_text(), "the attempt was promoting when killed"

    assert registry.verify() == []
    assert registry.champion() == "v0002" and registry.versions() == ["v0001", "v0002", "v0003"]
    check_champion_loads(registry)
    assert len(registry.history()) == len(history(lifecycle["registry"])), "a killed attempt records nothing"
    with registry.lock():  # the kernel released the dead process's lock
        assert registry.remove_partial_versions() == [p.name for p in partial]
    assert not [p for p in registry.versions_dir.iterdir() if p.name.startswith(TMP_PREFIX)]


@pytest.mark.parametrize("moment", ["champion-set", "retention"])
def test_a_sigterm_after_the_decision_keeps_its_exit_code_and_record(lifecycle, tmp_path, monkeypatch, capsys, moment):
    """A SIGTERM (a job's timeout) right after the champion pointer moved, or in ``--keep`` retention after the
    promotion was recorded: the attempt still exits with its decision's code (0), without a traceback, and the
    history row says promoted (trial finding: exit 1 and a traceback, so the scheduler retried a promotion that
    had happened; a SIGTERM between the pointer and the row would have recorded a failure beside a new champion)."""
    import pipelines.registry_upkeep as upkeep

    copy = tmp_path / "registry"
    shutil.copytree(lifecycle["registry"], copy)
    registry = ModelRegistry(copy, "healthcare")
    before = registry.versions()

    def then_terminated(real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to this process's handler (pipelines.retrain)
            return result

        return call

    if moment == "champion-set":
        monkeypatch.setattr(ModelRegistry, "set_champion", then_terminated(ModelRegistry.set_champion))
    else:
        monkeypatch.setattr(upkeep, "prune", lambda *a, **k: then_terminated(lambda: None)() or {"removed": [], "run_folders": []})
    capsys.readouterr()
    code = retrain(copy, tmp_path / "runs", *TINY, "--data.synthetic_seed=5", "--trainer.logger=false", "--margin=-1", "--keep=1")
    err = capsys.readouterr().err
    assert code == ExitCode.PROMOTED, err
    assert "stopped (SIGTERM) after the decision was recorded (promoted, exit 0)" in err and "Traceback" not in err, err
    assert registry.history()[-1]["decision"] == "promoted" and registry.history()[-1]["exit_code"] == 0
    assert registry.verify() == [] and len(registry.versions()) == len(before) + 1 and registry.champion() == registry.versions()[-1]
    check_champion_loads(registry)


def test_fingerprint_hashes_file_contents_not_names_or_times(tmp_path):
    data = tmp_path / "table.csv"
    data.write_text("a,b\n1,2\n")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"\x89PNG-1")
    config = {"data": {"csv": str(data), "image_dir": str(folder), "batch_size": 8}, "model": {"lr": 0.1}}
    before = fingerprint(config)
    assert set(before["files"]) == {str(data), str(folder)}
    os.utime(data, (1, 1))
    assert fingerprint(config)["digest"] == before["digest"], "touching a file is not new data"
    data.write_text("a,b\n1,3\n")
    assert fingerprint(config)["digest"] != before["digest"]
    data.write_text("a,b\n1,2\n")
    (folder / "y.png").write_bytes(b"\x89PNG-2")
    assert fingerprint(config)["digest"] != before["digest"], "a new file in a data folder is new data"


@pytest.mark.parametrize("domain", available_domains())
def test_every_domain_has_a_retraining_metric_and_fingerprint(domain):
    spec = get_domain(domain)
    assert evaluation_metric_key(spec.monitor).startswith("test/")
    rules = Selection.for_domain(spec, None, [])
    assert rules.preference and all(rules.direction(name) in ("max", "min") for name in rules.preference)
    assert rules.sanity and all(rules.direction(key) is not None for key, _, _ in rules.sanity), "every domain has sanity floors on metrics it logs"
    # a metric in the model's own units is compared only where the domain can tell whether two models' units agree
    assert not spec.unit_dependent_metrics or spec.units_differences, f"{domain}: unit_dependent_metrics without units_differences"
    assert all(rules.direction(name) for name in spec.unit_dependent_metrics)
    config = resolve_config(domain, list(spec.test_args))
    assert fingerprint(config)["digest"] == fingerprint(resolve_config(domain, list(spec.test_args)))["digest"]
    other = resolve_config(domain, [*spec.test_args, f"--data.batch_size={config['data']['batch_size'] + 1}"])
    assert fingerprint(other)["digest"] != fingerprint(config)["digest"]


def test_a_loss_in_other_units_is_not_compared():
    """Selection.decide: finance's test/loss (own robust-scaled units) decides only between models whose units agree."""
    rules = Selection.for_domain(get_domain("finance"), None, [])
    champion = {"version": "v0001", "metrics": {"test/loss": 80.39}}
    promote, reason, metric, _ = rules.decide({"test/loss": 3.89}, champion, 0.0, None, ["amount: scale 4e+05 vs 30, centre 900 vs 50"])
    assert not promote and metric == "test/loss" and "amount: scale 4e+05" in reason and "promote it by hand" in reason
    assert rules.decide({"test/loss": 3.89}, champion, 0.0, None, [])[0], "units that agree: the smaller loss wins"
    promote, reason, metric, _ = rules.decide({"test/auprc": 0.3, "test/loss": 3.89}, {"version": "v0001", "metrics": {"test/auprc": 0.2}}, 0.0, None, ["x"])
    assert promote and metric == "test/auprc", "a label metric does not depend on the preprocessing's units"


def test_a_class_the_champion_does_not_know_is_refused_before_training(lifecycle, tmp_path, capsys):
    """Labels with a class the champion was not trained on (class_names inferred from the labels, not given), or
    the champion's classes in another order, are refused before training: exit 2, naming the classes, advising
    to map the data back or start a new registry (it was trained, and could replace the champion with a model of
    another output head)."""
    import numpy as np
    import pandas as pd

    from tests.medical_files import write_png

    copy, runs = tmp_path / "registry", tmp_path / "runs"
    shutil.copytree(lifecycle["registry"], copy)
    registry = ModelRegistry(copy, "healthcare")
    before = (registry.versions(), registry.champion(), len(registry.history()))

    def table(folder: Path, names: list[str]) -> Path:
        rng = np.random.default_rng(0)
        rows = [{"path": str(write_png(folder / "images" / f"case{i:03d}.png", rng.integers(0, 255, (32, 32)))), "label": names[i % len(names)],
                 "split": ("train", "train", "val", "test")[(i // len(names)) % 4]} for i in range(16 * len(names))]  # fmt: skip
        pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
        return folder / "labels.csv"

    new_class = table(tmp_path / "new", ["normal", "benign", "malignant", "atypical"])  # a new kind of finding appears in tonight's export
    capsys.readouterr()
    assert retrain(copy, runs, *TINY, "--data.labels_csv", str(new_class)) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "class_names: champion ['normal', 'benign', 'malignant']" in err and "not known to the champion: ['atypical']" in err, err[-3000:]
    assert "--registry NEW_DIR" in err and "Map the data back" in err
    assert not runs.exists() or not list((runs / "healthcare").glob("retrain-*")), "nothing was trained"
    assert (registry.versions(), registry.champion()) == before[:2]
    row = registry.history()[-1]
    assert len(registry.history()) == before[2] + 1 and row["exit_code"] == 2 and "atypical" in row["error"]
    # the champion's classes declared in another order: the model's outputs would mean other classes
    same_classes = table(tmp_path / "same", ["normal", "benign", "malignant"])
    assert retrain(copy, runs, *TINY, "--data.labels_csv", str(same_classes), "--data.class_names=[benign,normal,malignant]") == ExitCode.USAGE
    assert "(the same entries in another order)" in capsys.readouterr().err
    assert registry.versions() == before[0]
