"""The registry's folder without training: retention (``gc --keep`` / ``retrain --keep``) on a runs folder that
other registries and people share, and the evaluation pin of a registry moved to another path."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipelines.model_registry import ModelRegistry
from pipelines.registry_cli import main as registry_main
from pipelines.registry_upkeep import prune

OLD = time.mktime((2020, 1, 1, 0, 0, 0, 0, 0, -1))


def _folder(path: Path, mtime: float) -> Path:
    path.mkdir(parents=True)
    (path / "summary.json").write_text("{}")
    os.utime(path, (mtime, mtime))
    return path


def test_retention_removes_only_this_registrys_own_attempt_folders(tmp_path):
    """Data-loss guard: retention used to remove every ``retrain-*`` folder of the runs folder older than the
    newest N attempts, also another registry's attempts and a person's runs that happened to share the folder."""
    runs = tmp_path / "runs" / "finance"
    registry = ModelRegistry(tmp_path / "registry", "finance")
    mine_old, mine_new = "retrain-20200101-000000-aaaaaa", "retrain-20200301-000000-bbbbbb"
    for attempt in (mine_old, mine_new):
        registry.append_history({"attempt": attempt, "domain": "finance", "decision": "failed", "run_dir": str(runs / attempt)})
    _folder(runs / mine_old, OLD)
    _folder(runs / f"{mine_old}-eval-challenger", OLD)
    _folder(runs / mine_new, OLD + 86400 * 60)
    foreign = [  # another registry's attempts sharing the runs folder, a person's runs: all older than anything kept
        "retrain-20191231-000000-cccccc", "retrain-20191231-000000-cccccc-eval-challenger", "retrain-by-hand", "experiment-1", "20200101-000000-abcdef",
    ]  # fmt: skip
    for name in foreign:
        _folder(runs / name, OLD - 86400)
    assert registry_main(["finance", "gc", "--keep", "1", "--runs_dir", str(tmp_path / "runs"), "--registry", str(tmp_path / "registry")]) == 0
    assert not (runs / mine_old).exists() and not (runs / f"{mine_old}-eval-challenger").exists(), "this registry's old attempt goes"
    assert (runs / mine_new).is_dir(), "the newest attempt stays"
    assert sorted(p.name for p in runs.iterdir()) == sorted([mine_new, *foreign]), "every foreign folder survives, whatever its name or age"
    assert (runs / foreign[0] / "summary.json").is_file()
    row = registry.history()[-1]
    assert row["decision"] == "pruned" and row["run_folders"] == sorted([mine_old, f"{mine_old}-eval-challenger"])


def test_the_evaluation_pin_is_relative_so_a_moved_registry_still_finds_its_snapshot(tmp_path):
    """A registry folder moved or mounted elsewhere (a Kubernetes volume at another path, a restored backup)
    keeps its evaluation set: ``evaluation.json`` names its snapshot as ``@registry/...``, not by absolute path."""
    import json
    import shutil

    from pipelines import evaluation_set

    data = tmp_path / "latest.csv"
    data.write_text("amount,is_fraud\n1.0,0\n2.0,1\n")
    registry = ModelRegistry(tmp_path / "old" / "registry", "finance")
    registry.append_history({"decision": "promoted"})
    registry.pin_evaluation(evaluation_set.snapshot(registry, {"path": str(data), "batch_size": 8}))
    stored = json.loads((registry.path / "evaluation.json").read_text())
    assert stored["data"]["path"] == "@registry/evaluation/" + Path(stored["data"]["path"]).parent.name + "/latest.csv"
    assert str(tmp_path / "old") not in json.dumps({k: v for k, v in stored.items() if k != "source"}), stored
    assert stored["source"]["path"] == str(data.resolve()), "the user's own file keeps its path"

    shutil.move(tmp_path / "old", tmp_path / "mounted")  # the old path is gone
    moved = ModelRegistry(tmp_path / "mounted" / "registry", "finance")
    pinned = moved.evaluation()
    snapshot = Path(pinned["data"]["path"])
    assert snapshot.is_file() and snapshot.is_relative_to(tmp_path / "mounted") and snapshot.read_text() == data.read_text()
    assert list(pinned["files"]) == [str(snapshot)]
    assert moved.verify() == [], "verify reads the pin where the registry is now"
    evaluation_set.check(moved, pinned)  # what every retrain runs before training: no error
    with moved.lock():
        assert prune(moved, 1, [])["snapshots"] == [], "the pinned snapshot is kept"
    assert snapshot.is_file()

    # a legacy pin with absolute paths still reads: where they exist, and after its registry moved
    (moved.path / "evaluation.json").write_text(json.dumps(pinned))
    assert moved.evaluation()["data"]["path"] == str(snapshot) and moved.verify() == []
    shutil.move(tmp_path / "mounted", tmp_path / "elsewhere")
    again = ModelRegistry(tmp_path / "elsewhere" / "registry", "finance")
    assert Path(again.evaluation()["data"]["path"]).is_relative_to(tmp_path / "elsewhere") and again.verify() == []
