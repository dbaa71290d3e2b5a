"""Retraining policies with real finance runs on a rolling ``latest.npz``: the registry-owned
evaluation snapshot, failed and diverged attempts that never pin or promote, the selection metric
and its validation before training, repin, an unwritable registry, orphan versions, safe loading,
aliases and retention.

One registry lives through four nights (module fixture, in this process): a corrupt file (failed),
a diverging learning rate (trained, rejected by the sanity floors: no champion, no pin), a good
night (promoted, evaluation set pinned as a snapshot), and a refreshed ``latest.npz`` (trains
again instead of failing on a changed file). Other tests work on copies of it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.files import sha256_file
from pipelines.fingerprint import fingerprint
from pipelines.model_registry import ModelRegistry, RegistryError
from pipelines.registry_cli import main as registry_main
from pipelines.retrain import main as retrain_main
from pipelines.retrain_steps import ExitCode, resolve_config
from tests.conftest import child_env
from tests.helpers import FAST, write_night
from tests.processes import run_child

def retrain(root: Path, *args: str) -> int:
    return retrain_main(["finance", "--registry", str(root / "registry"), "--runs_dir", str(root / "runs"), *FAST, "--data.path", str(root / "latest.npz"), *args])


@pytest.fixture(scope="module")
def nights(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rolling")
    registry = ModelRegistry(root / "registry", "finance")
    steps: dict = {"root": root}
    (root / "latest.npz").write_bytes(b"PK\x03\x04 not really a zip")
    steps["corrupt"] = retrain(root)
    steps["pinned_after_corrupt"] = registry.evaluation()
    write_night(root / "latest.npz", 1)
    steps["diverged"] = retrain(root, "--model.lr=1")  # the largest lr finance takes: test loss ~5e10, still ranks above chance
    steps["after_diverged"] = (registry.champion(), registry.evaluation())
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stderr(io.StringIO()) as stderr:  # W&B refuses this night's key
        env.delenv("WANDB_MODE", raising=False)  # FAST has no W&B logger: the decision run is the only W&B client
        env.setenv("WANDB_API_KEY", "rejected")
        steps["good"] = retrain(root)
    steps["good_stderr"] = stderr.getvalue()
    sys.stderr.write(steps["good_stderr"])
    steps["pinned"] = registry.evaluation()
    write_night(root / "latest.npz", 2)
    steps["refreshed"] = retrain(root, "--metric", "test/auroc")
    return steps


def test_failed_and_diverged_attempts_never_pin_or_promote(nights):
    registry = ModelRegistry(nights["root"] / "registry", "finance")
    assert nights["corrupt"] == ExitCode.FAILED and nights["pinned_after_corrupt"] is None
    assert nights["diverged"] == ExitCode.KEPT_CHAMPION and nights["after_diverged"] == (None, None)
    corrupt, diverged = registry.history()[:2]
    assert corrupt["decision"] == "failed" and corrupt["exit_code"] == 1
    # the diverged model still ranks better than chance here; the untrained-network baseline catches it
    assert diverged["decision"] == "rejected" and "(untrained) (sanity)" in diverged["reason"], diverged["reason"]
    assert diverged["challenger"]["metrics"]["test/loss"] > 1e6 * diverged["baseline"]["test/loss"]
    assert nights["good"] == ExitCode.PROMOTED and registry.champion() == "v0002"


def test_the_evaluation_set_is_a_snapshot_so_a_refreshed_file_trains_again(nights):
    registry = ModelRegistry(nights["root"] / "registry", "finance")
    pinned = nights["pinned"]
    snapshot = Path(pinned["data"]["path"])
    assert snapshot.is_relative_to(registry.path / "evaluation") and snapshot.name == "latest.npz"
    assert pinned["source"]["path"] == str(nights["root"] / "latest.npz")
    assert pinned["files"] == {str(snapshot): sha256_file(snapshot)}
    # night 2 overwrote latest.npz: the attempt trained and compared on the unchanged snapshot
    assert nights["refreshed"] in (ExitCode.PROMOTED, ExitCode.KEPT_CHAMPION)
    assert registry.evaluation() == pinned
    row = registry.history()[-1]
    assert row["metric"] == "test/auroc" and row["champion"]["version"] == "v0002", "--metric overrides the domain's selection"
    good = registry.history()[2]
    assert good["metric"] == "test/auprc" and good["mode"] == "max", "finance selects on AUPRC where labels exist"


def test_each_trained_attempt_logs_its_decision_to_wandb_and_a_wandb_failure_keeps_the_decision(nights, tmp_path, capsys, monkeypatch):
    """The decision runs (pipelines.retrain_wandb) hold each attempt's scores, decision, reason and version, and the
    dashboard's retraining panels name only what they logged; W&B refusing the good night's key changed nothing."""
    from pipelines.dashboard import main as dashboard_main, panel_metrics
    from tests.wandb_offline import history as wandb_history, run_config, run_record

    registry = ModelRegistry(nights["root"] / "registry", "finance")
    rows = registry.history()
    assert [row["decision"] for row in rows] == ["failed", "rejected", "promoted", rows[3]["decision"]]
    good = rows[2]
    assert nights["good"] == ExitCode.PROMOTED and registry.champion_record()["version"] in ("v0002", "v0003")
    assert "[retrain] warning: decision not logged to W&B: W&B failed (AuthenticationError" in nights["good_stderr"], nights["good_stderr"][-3000:]
    assert "[retrain] promoted (exit 0)" in nights["good_stderr"] and not list(Path(good["run_dir"]).glob("decision/wandb/offline-run-*"))
    logged: set[str] = set()
    for row in (rows[0], rows[1], rows[3]):  # corrupt file (failed in training), diverged (rejected, no champion yet), refreshed (against v0002)
        files = list(Path(row["run_dir"]).glob("decision/wandb/offline-run-*/run-*.wandb"))
        assert len(files) == 1, files
        run, (numbers,), config = run_record(files[0]), wandb_history(files[0]), run_config(files[0])
        assert (run.run_group, run.job_type, run.run_id) == ("retrain-finance", "retrain-decision", f"{row['attempt']}-decision")
        assert {k: numbers[f"retrain/{k}"] for k in ("promoted", "rejected", "failed")} == {k: int(row["decision"] == k) for k in ("promoted", "rejected", "failed")}
        challenger, champion = row.get("challenger", {}), row["champion"]
        assert numbers.get("retrain/challenger_score") == (pytest.approx(challenger["score"]) if challenger else None)
        assert numbers.get("retrain/version") == (int(challenger["version"][1:]) if challenger else None)
        assert numbers.get("retrain/champion_score") == (pytest.approx(champion["score"]) if champion.get("score") is not None else None)
        assert config["retrain/reason"] == row.get("reason", row.get("error")) and config["retrain/decision"] == row["decision"] and config["retrain/metric"] == row["metric"]
        logged |= {k for k in numbers if not k.startswith("_")}
    assert "retrain/champion_score" in logged

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "dashboard.json"
    assert dashboard_main(["finance", "--run_dir", rows[3]["run_dir"], "--out", str(out)]) == 0
    named = set(panel_metrics(json.loads(out.read_text()))["Retraining history"])
    scalars = {key for line in (Path(rows[3]["run_dir"]) / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    assert {k for k in named if k.startswith("retrain/")} and not named - logged - scalars, sorted(named - logged - scalars)


def test_names_and_registry_are_checked_before_anything_is_written(tmp_path):
    started = time.time()
    code = retrain_main(["finance", "--registry", str(tmp_path / "registry"), "--floor", "test/aucroc>=0.5"])
    assert code == ExitCode.USAGE and time.time() - started < 5
    assert retrain_main(["finance", "--registry", str(tmp_path / "registry"), "--metric", "test/alert_rate"]) == ExitCode.USAGE
    assert not (tmp_path / "registry").exists()


def read_only(folder: Path, command: list[str]) -> list[str]:
    """``command`` run with ``folder`` read-only: a read-only bind mount in a private mount namespace
    when we are root (root writes through permission bits), else the permission bits."""
    if os.geteuid() != 0:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)
        return command
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("root without the right to make a read-only mount (unshare -m)")
    mount = f"mount --bind -o ro {shlex.quote(str(folder))} {shlex.quote(str(folder))}"
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mount} && exec {shlex.join(command)}"]


@pytest.mark.parametrize("which", ["registry", "versions"])
def test_an_unwritable_registry_fails_in_one_line_before_training(nights, tmp_path, which):
    copy = tmp_path / "registry"
    shutil.copytree(nights["root"] / "registry", copy)
    command = [sys.executable, "-m", "pipelines.retrain", "finance", "--registry", str(copy), "--runs_dir", str(tmp_path / "runs"), *FAST, "--force"]
    command = read_only(copy if which == "registry" else copy / "finance" / "versions", command)
    done = run_child(command, 120, cwd=tmp_path, env=child_env())
    assert done.returncode == ExitCode.FAILED, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not writable" in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "runs").exists(), "nothing may be trained"


def test_repin_replaces_the_snapshot_and_rescores_the_champion(nights, tmp_path, capsys):
    root = tmp_path
    shutil.copytree(nights["root"] / "registry", root / "registry")
    registry = ModelRegistry(root / "registry", "finance")
    old = registry.evaluation()
    write_night(root / "holdout.npz", 7)
    code = registry_main(["finance", "repin", "--registry", str(root / "registry"), "--reason", "new holdout export", "--data.path", str(root / "holdout.npz"), "--runs_dir", str(root / "runs"), "--trainer.logger=false"])
    assert code == 0, capsys.readouterr().err[-2000:]
    new = registry.evaluation()
    assert new["fingerprint"] != old["fingerprint"] and new["source"]["path"] == str(root / "holdout.npz")
    row = registry.history()[-1]
    assert row["decision"] == "repin" and row["reason"] == "new holdout export"
    assert row["champion"]["version"] == registry.champion() and "test/auprc" in row["champion"]["metrics"]
    # a damaged snapshot fails the next attempt, naming the command that fixes it
    Path(new["data"]["path"]).write_bytes(b"damaged")
    write_night(root / "latest.npz", 9)
    assert retrain(root) == ExitCode.FAILED
    assert "repin" in registry.history()[-1]["error"]


def test_an_orphan_version_is_reconciled_and_not_retrained(nights, tmp_path):
    root = tmp_path
    shutil.copytree(nights["root"] / "registry", root / "registry")
    registry = ModelRegistry(root / "registry", "finance")
    champion = registry.champion()
    write_night(root / "latest.npz", 2)
    config = resolve_config("finance", [*FAST, "--data.path", str(root / "latest.npz"), "--runs_dir", str(root / "runs")])
    # the state a kill leaves between writing a version and moving the pointer: the registry's own writer
    best = Path(registry.metadata(champion)["run_dir"]) / "checkpoints" / "best.ckpt"
    meta = {**registry.metadata(champion), "fingerprint": fingerprint(config)["digest"], "attempt": "retrain-killed",
            "decision": {"promote": True, "reason": "promoted: test", "against": champion}}  # fmt: skip
    for key in ("version", "domain", "created_at"):
        meta.pop(key)
    orphan = registry.add_version(best, (registry.version_dir(champion) / "config.yaml").read_text(), meta, "TransactionDataModule")
    assert registry.champion() == champion
    assert retrain(root) == ExitCode.NOTHING_NEW, "the orphan is reconciled first, so its data is not trained again"
    assert registry.champion() == orphan and registry.champion_record()["previous"][-1] == champion
    reconciled = [row for row in registry.history() if row.get("reconciled")]
    assert [(r["decision"], r["challenger"]["version"]) for r in reconciled] == [("promoted", orphan)]
    assert registry.verify() == []


def test_load_model_refuses_classes_outside_the_domain_and_edited_metadata(nights, tmp_path):
    shutil.copytree(nights["root"] / "registry", tmp_path / "registry")
    registry = ModelRegistry(tmp_path / "registry", "finance")
    version = registry.champion()
    assert type(registry.load_model()).__name__ == "FraudAutoencoder"
    folder = registry.version_dir(version)
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**meta, "model_class": "subprocess.Popen"}))
    with pytest.raises(RegistryError, match="metadata.json does not match"):
        registry.load_model()
    sums = folder / "SHA256SUMS"  # an editor who also rewrites the checksums still cannot pick the class
    sums.write_text("".join(f"{sha256_file(folder / n)}  {n}\n" for n in [line.split("  ")[1] for line in sums.read_text().splitlines()]))
    with pytest.raises(RegistryError, match="refusing to load"):
        registry.load_model()


def test_verify_checks_the_rollback_chain_and_the_evaluation_pin(nights, tmp_path, capsys):
    """``registry verify`` covers what a rollback or the next retrain relies on: every previous champion
    of the rollback chain and the pinned evaluation set (trial finding: it said valid while the
    rollback target was corrupt, or while a truncated evaluation.json made every retrain fail)."""
    shutil.copytree(nights["root"] / "registry", tmp_path / "registry")
    registry = ModelRegistry(tmp_path / "registry", "finance")
    cli = ["--registry", str(tmp_path / "registry")]
    target = next(v for v in registry.versions() if v != registry.champion())
    assert registry_main(["finance", "promote", target, *cli]) == 0
    chain = registry.rollback_chain()
    assert len(chain) >= 2 and registry.verify() == [] and registry_main(["finance", "verify", *cli]) == 0
    weights = registry.version_dir(chain[1]) / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact + b"garbage")  # bit rot on the version `rollback` would restore
    assert any(p.startswith("rollback target 1") and chain[1] in p for p in registry.verify()), registry.verify()
    capsys.readouterr()
    assert registry_main(["finance", "verify", *cli]) == 1 and "rollback target 1" in capsys.readouterr().out
    weights.write_bytes(intact)
    pin = tmp_path / "registry" / "finance" / "evaluation.json"
    record = pin.read_text()
    snapshot = Path(next(iter(registry.evaluation()["files"])))  # the file stores it as @registry/... (the registry may move)
    snapshot_bytes = snapshot.read_bytes()
    snapshot.write_bytes(b"damaged")
    assert any(p.startswith("evaluation pin:") and "changed or damaged" in p for p in registry.verify()), registry.verify()
    snapshot.write_bytes(snapshot_bytes)
    pin.write_text(record[:40])  # cut
    assert any(p.startswith("evaluation pin:") and "not valid JSON" in p for p in registry.verify()), registry.verify()
    pin.write_text(record)
    assert registry.verify() == []
    # a registry version folder is a reference for the monitor: its checkpoint holds the training split's statistics
    from pipelines.monitor import main as monitor_main
    from pipelines.reference import load_reference, reference_frame

    version_dir = registry.version_dir(chain[0])
    reference_frame(load_reference(version_dir)).to_csv(tmp_path / "window.csv", index=False)  # the training split itself: no drift
    assert monitor_main([str(version_dir), str(tmp_path / "window.csv"), "--only", "drift"]) == 0, capsys.readouterr()
    # a champion pointer naming a version that is gone: exit 1 naming it (it was exit 2, "no version or alias 'champion'")
    pointer = tmp_path / "registry" / "finance" / "champion.json"
    pointer.write_text(pointer.read_text().replace(f'"{chain[0]}"', '"v0099"', 1))
    capsys.readouterr()
    assert registry_main(["finance", "show", "champion", *cli]) == 1
    assert "champion names v0099, which is not in" in capsys.readouterr().err


def test_aliases_and_retention_keep_the_champion_chain(nights, tmp_path):
    root = tmp_path
    shutil.copytree(nights["root"] / "registry", root / "registry")
    shutil.copytree(nights["root"] / "runs", root / "runs")
    registry = ModelRegistry(root / "registry", "finance")
    cli = ["--registry", str(root / "registry")]
    assert registry_main(["finance", "alias", "set", "staging", "v0002", *cli]) == 0
    assert registry_main(["finance", "alias", "set", "champion", "v0001", *cli]) == 2, "the champion moves only by promote/rollback: a usage error (exit 2)"
    assert registry.aliases() == {"staging": "v0002"} and registry.history()[-1]["decision"] == "alias-set"
    assert registry.resolve("staging") == "v0002"
    diverged = registry.metadata("v0001")["attempt"]
    assert (root / "runs" / "finance" / diverged).is_dir()
    assert registry_main(["finance", "gc", "--keep", "1", "--runs_dir", str(root / "runs"), *cli]) == 0
    assert registry.versions() == ["v0002", "v0003"], "v0001 was rejected, not aliased, not the newest: removed"
    assert not list((root / "runs" / "finance").glob(f"{diverged}*")), "its run folders are removed with it"
    assert (root / "runs" / "finance" / registry.metadata("v0002")["attempt"]).is_dir()
    assert registry.verify() == [] and registry.history()[-1]["decision"] == "pruned" and registry.history()[-1]["removed"] == ["v0001"]
    assert registry.next_version() == "v0004"
    assert registry_main(["finance", "alias", "rm", "staging", *cli]) == 0 and registry.aliases() == {}


def test_a_killed_runs_epochs_reach_wandb_once_after_resume(tmp_path):
    """SIGKILL a real training after its first checkpoint; the resumed run, with ReplayMetrics,
    holds every epoch in W&B exactly once (the killed segment's file may be cut to its header)."""
    from pipelines.wandb_replay import logged_epochs
    from tests.conftest import kill_at_first_checkpoint, only_run, read_jsonl, run_pipeline

    runs = tmp_path / "runs"
    args = ["finance", "fit", "--data.synthetic_rows=1200", "--data.batch_size=64", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
            "--runs_dir", str(runs), "--trainer.max_epochs=4", "--trainer.callbacks+=tests.helpers.PauseEachBatch", "--trainer.callbacks.seconds=0.3"]  # fmt: skip
    kill_at_first_checkpoint(args, "finance/*/checkpoints/last.ckpt", runs, settle=0.2)
    run = only_run(runs, "finance")
    killed = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["stage"] == "fit"]
    assert 1 <= len(killed) < 4
    run_pipeline(*args, "--ckpt_path", "last")  # the runner adds ReplayMetrics to every resume; in this process: only the killed run needs its own
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    assert len(files) == 2
    from tests.wandb_offline import history

    rows = [row for f in files for row in history(f, finished=f != files[0]) if "val/loss" in row]
    assert sorted(row["epoch"] for row in rows) == [0, 1, 2, 3], "every epoch's validation in W&B, once"
    # the killed segment's file holds what W&B wrote before the kill (often nothing past its header):
    # exactly the epochs it lacks are replayed, so a surviving segment is never duplicated either
    replayed = [row for row in rows if row.get("replayed")]
    assert {row["epoch"] for row in replayed} == set(range(len(killed))) - logged_epochs(files[0])
    native = [row for row in rows if not row.get("replayed")]
    assert {row["trainer/global_step"] - row["epoch"] * 3 for row in rows} == {2}, "replayed rows sit where Lightning logs epoch ends"
    assert native


def test_unsupervised_losses_in_other_units_are_not_compared_so_a_model_fitted_on_garbage_is_not_promoted(tmp_path, capsys):
    """Without labels finance selects on test/loss, which each model measures in its own robust-scaled units.
    A challenger fitted on a night of garbage numbers (huge scales) shrinks the evaluation rows and
    "reconstructs" them with a tiny loss; compared raw, it was promoted (trial finding: 3.89 vs 80.39).
    Losses in different units are not compared: the champion stays, and the reason names the columns."""
    import numpy as np

    from domains.finance.synthetic import make_card_transactions

    latest = tmp_path / "latest.csv"
    unsupervised = ["--data.path", str(latest), "--data.label_column=null", "--data.label_classes=null", "--data.ignore_columns=[is_fraud]",
                    "--data.mode=unsupervised", "--data.batch_size=64", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.logger=false"]  # fmt: skip
    command = ["finance", "--registry", str(tmp_path / "registry"), "--runs_dir", str(tmp_path / "runs"), *unsupervised]
    make_card_transactions(1200, fraud_rate=0.05, seed=1).to_csv(latest, index=False)
    assert retrain_main(command) == ExitCode.PROMOTED
    garbage = make_card_transactions(1200, fraud_rate=0.05, seed=2)
    rng = np.random.default_rng(0)
    garbage["amount"] = (garbage["amount"] * np.exp(rng.normal(0, 6, len(garbage)))).round(2)  # an upstream bug: random magnitudes
    garbage["distance_from_home_km"] = rng.normal(0, 50000, len(garbage)).round(1)
    garbage["customer_age"] = rng.normal(0, 2000, len(garbage)).round(0)
    garbage.to_csv(latest, index=False)
    capsys.readouterr()
    code = retrain_main(command)
    err = " ".join(capsys.readouterr().err.split())
    registry = ModelRegistry(tmp_path / "registry", "finance")
    row = registry.history()[-1]
    assert code == ExitCode.KEPT_CHAMPION and registry.champion() == "v0001", err[-3000:]
    assert "measured in each model's own preprocessing units, and the challenger's differ" in row["reason"], row["reason"]
    assert "amount: scale" in row["reason"] and "registry finance promote" in row["reason"], row["reason"]
    assert row["challenger"]["metrics"]["test/loss"] < row["champion"]["metrics"]["test/loss"], "the raw losses would have promoted it"


def test_data_with_another_schema_is_refused_before_training(nights, tmp_path, capsys):
    """Tonight's export has two more feature columns: refused before anything is trained or written (exit 2),
    naming the columns, advising to map the data back or start a new registry."""
    import numpy as np

    root = tmp_path
    shutil.copytree(nights["root"] / "registry", root / "registry")
    registry = ModelRegistry(root / "registry", "finance")
    before = (registry.versions(), registry.champion(), registry.evaluation())
    write_night(root / "latest.npz", 5)
    data = np.load(root / "latest.npz")
    np.savez(root / "wide.npz", X=np.c_[data["X"], data["X"][:, :2]], y=data["y"])
    capsys.readouterr()
    assert retrain(root, "--data.path", str(root / "wide.npz")) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "preprocessor.roles.numeric_columns: champion ['x0'" in err and "(not known to the champion: ['x12', 'x13'])" in err, err[-3000:]
    assert "--registry NEW_DIR" in err
    assert not (root / "runs").exists(), "nothing was trained"
    assert (registry.versions(), registry.champion(), registry.evaluation()) == before
    assert registry.history()[-1]["exit_code"] == 2 and "x12" in registry.history()[-1]["error"]
