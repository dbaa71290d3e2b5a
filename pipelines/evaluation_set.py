"""The evaluation set: a snapshot the registry owns, so that rolling data never breaks retraining.

Policy (``docs/retraining.md``): a model is scored by the runner's own ``test`` on the *test split*
of a pinned data config. When pinned, every file or folder that config names (an ``.npz``, a CSV,
an image folder) is **copied into the registry**, content-addressed
(``REGISTRY/<domain>/evaluation/<sha256>-<name>/<name>``), and the pinned config points at the copies.
The nightly job can then overwrite ``latest.npz`` as often as it likes: the evaluation set stays the
same bytes, and both champion and challenger are scored on exactly those items, every night.

- The data config is that of the attempt that makes the first champion (or ``--eval_config``'s
  ``data`` section). A failed or rejected attempt never pins; the pin is written only together
  with the first promotion.
- ``python -m pipelines.registry DOMAIN repin --reason WHY [--eval_config F | data options]``
  replaces it (a new snapshot) and re-scores the champion on it, recorded in the history.
- The snapshot is checked (sha256) before each attempt; a damaged copy fails the attempt with the
  repin command to run.

Only files the data config names are copied: a file that itself refers to other files by path
(e.g. a labels CSV naming images elsewhere) keeps those references.

With a **stable split rule** (``--data.split_by hash|time|column``, :mod:`pipelines.splits`) pinned
from the training data itself (:func:`for_attempt`): every attempt must split by the same rule
(another rule is refused: the pinned test rows could be in its training split), and both models
are scored on the test split of *this attempt's* data, snapshotted the same way: the rule keeps
every earlier row where it was, so that split holds no row any model trained on, and it grows
with the data instead of freezing the first night's rows.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipelines.files import fsync_dir
from pipelines.fingerprint import absolute_paths, changed_files, fingerprint, hash_path, path_values
from pipelines.model_registry import ModelRegistry, now
from pipelines.retrain_steps import ExitCode, RetrainError, run_step, write_yaml
from pipelines.splits import is_stable_config, rule_of_config

SNAPSHOT_DIR = "evaluation"


def _replace_paths(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _replace_paths(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_paths(v, mapping) for v in value]
    return mapping.get(value, value) if isinstance(value, str) else value


def snapshot(registry: ModelRegistry, data: dict[str, Any]) -> dict[str, Any]:
    """Copy every file/folder ``data`` names into the registry (content-addressed, atomic) and return
    the evaluation record (not pinned yet): ``{"data", "source", "files", "fingerprint"}``."""
    source = absolute_paths(data)
    mapping = {}
    for path in sorted(set(path_values(source))):
        digest = hash_path(Path(path))
        target_dir = registry.path / SNAPSHOT_DIR / f"{digest}-{Path(path).name}"  # content and name: never shared
        target = target_dir / Path(path).name
        if not target.exists():
            tmp = registry.path / SNAPSHOT_DIR / f".tmp-{digest}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (shutil.copytree if Path(path).is_dir() else shutil.copy2)(path, tmp / Path(path).name)
            if hash_path(tmp / Path(path).name) != digest:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RetrainError(ExitCode.FAILED, f"evaluation file {path} changed while it was copied into {target_dir}: retry")
            shutil.rmtree(target_dir, ignore_errors=True)  # only a damaged copy of these same bytes can be there
            os.rename(tmp, target_dir)
            fsync_dir(target_dir.parent)
        mapping[path] = str(target.resolve())
    pinned = _replace_paths(source, mapping)
    print_ = fingerprint({"data": pinned})
    return {"data": pinned, "source": source, "files": print_["files"], "fingerprint": print_["digest"]}


def check(registry: ModelRegistry, record: dict[str, Any]) -> None:
    """Fail (``RetrainError``) if a file of the pinned snapshot is missing or changed."""
    changed = changed_files(record.get("files", {}))
    if changed:
        path, expected, actual = changed[0]
        raise RetrainError(
            ExitCode.FAILED,
            f"evaluation snapshot {path} (pinned in {registry.path / 'evaluation.json'}) is damaged "
            f"(sha256 {expected[:12]} expected, found {actual[:12]}): replace it with "
            f"`python -m pipelines.registry {registry.domain} repin --reason ... [--eval_config FILE]`",
        )


def for_attempt(registry: ModelRegistry, pinned: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The evaluation record of an attempt training on ``data`` when ``pinned`` is pinned: ``pinned``
    itself, unless it was pinned from training data split by a stable rule (see the module
    docstring): then a snapshot of ``data``, which must split by the same rule (else ``RetrainError``, exit 2)."""
    source = pinned.get("source", pinned["data"])
    if not is_stable_config(source) or sorted(path_values(source)) != sorted(path_values(absolute_paths(data))):
        return pinned  # a random split's frozen snapshot, or another file (--eval_config): that holdout stays
    if rule_of_config(source) != rule_of_config(data):
        raise RetrainError(
            ExitCode.USAGE,
            f"the evaluation set pinned in {registry.path / 'evaluation.json'} is held back by the split {rule_of_config(source)}; this "
            f"attempt splits by {rule_of_config(data)}, so rows held back from earlier models could be in its training split. Use "
            f"the pinned split options, or pin anew: `python -m pipelines.registry {registry.domain} repin --reason ... [data options]`",
        )
    record = snapshot(registry, data)
    print(f"[retrain] stable split {rule_of_config(data)}: both models are scored on this attempt's test split (snapshot {record['fingerprint'][:12]})", file=sys.stderr)
    return record


def align_scoring_options(checkpoint: Path, like: Path, names: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
    """Give ``checkpoint`` (a scratch copy: rewritten in place, atomically) the values ``like`` has of the model
    options ``names`` (the domain's ``scoring_options``), so that ``test`` measures both checkpoints alike;
    return what changed, ``{name: (old, new)}``. Both are read weights-only."""
    import torch

    from pipelines.files import atomic_write

    if not names:
        return {}
    target = torch.load(checkpoint, map_location="cpu", weights_only=True)
    reference = torch.load(like, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    options = target.get("hyper_parameters", {})
    changed = {name: (options.get(name), reference.get(name)) for name in names if name in reference and options.get(name) != reference.get(name)}
    if changed:
        options.update({name: new for name, (_, new) in changed.items()})
        atomic_write(checkpoint, lambda temporary: torch.save({**target, "hyper_parameters": options}, temporary))
    return changed


def score(
    domain: str,
    record: dict[str, Any],
    checkpoint: Path,
    model_config: dict[str, Any],
    base_config: dict[str, Any],
    runs_dir: Path,
    eval_id: str,
    config_path: Path,
    child: bool = False,
    group: str | None = None,
) -> dict[str, Any]:
    """Test ``checkpoint`` (with ``model_config``'s model section) on the evaluation set ``record``
    with the trainer settings of ``base_config`` on one device in one process; return
    ``{"metrics", "eval_run"}``; the run's config is written to ``config_path``. Non-finite metrics
    are kept as they are (the floors judge them)."""
    # one process on one device: no DistributedSampler padding, the same items for every model
    trainer = {**base_config["trainer"], "callbacks": None, "devices": 1, "num_nodes": 1, "strategy": "auto", "sync_batchnorm": False}
    eval_config = {"seed_everything": base_config.get("seed_everything"), "trainer": trainer, "model": model_config["model"], "data": record["data"]}
    write_yaml(config_path, eval_config)
    args = [domain, "test", "--config", str(config_path), "--runs_dir", str(runs_dir), "--run_id", eval_id, "--ckpt_path", str(checkpoint)]
    run_step(args, job_type="retrain-eval", child=child, group=group)
    summary_path = runs_dir / domain / eval_id / "summary.json"
    try:
        metrics = json.loads(summary_path.read_text())["test"]
    except (OSError, KeyError, json.JSONDecodeError) as error:
        raise RetrainError(ExitCode.FAILED, f"evaluation {eval_id} wrote no test metrics to {summary_path}: {error}") from None
    if not metrics:
        raise RetrainError(ExitCode.FAILED, f"evaluation {eval_id}: {summary_path} has no test metrics")
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "eval_run": str(summary_path.parent)}


def repin(registry: ModelRegistry, config: dict[str, Any], reason: str) -> dict[str, Any]:
    """``registry repin``: snapshot ``config["data"]`` as the new evaluation set, re-score the champion
    on it (its score there is recorded), then pin it and record the change. The caller holds the lock."""
    old = registry.evaluation()
    record = snapshot(registry, config["data"])
    row: dict[str, Any] = {"decision": "repin", "domain": registry.domain, "reason": reason,
                           "evaluation": {"old": (old or {}).get("fingerprint"), "new": record["fingerprint"], "source": record["source"]}}  # fmt: skip
    champion = registry.champion()
    if champion:
        runs_dir = Path(config.get("runs_dir") or "runs")
        eval_id = f"repin-{now().replace(':', '')}-{os.getpid()}"
        with tempfile.TemporaryDirectory(prefix="repin-") as scratch:
            checkpoint = registry.write_checkpoint(champion, Path(scratch) / "champion.ckpt")
            champion_config = _version_config(registry, champion)
            result = score(registry.domain, record, checkpoint, champion_config, config, runs_dir, eval_id, Path(scratch) / "evaluation.yaml")
        row["champion"] = {"version": champion, **result}
        print(f"[registry] champion {champion} on the new evaluation set: {json.dumps(result['metrics'])}", file=sys.stderr)
    registry.pin_evaluation(record, replace=True)
    registry.append_history(row)
    return row


def _version_config(registry: ModelRegistry, version: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((registry.version_dir(version) / "config.yaml").read_text()) or {}
