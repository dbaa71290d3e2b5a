"""Registry upkeep without training: retention (``gc --keep`` / ``retrain --keep``) on a runs folder that
other registries and people share."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipelines.model_registry import ModelRegistry
from pipelines.registry_cli import main as registry_main

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
