"""The scheduler examples in deploy/: parsed, validated, and run where the scheduler can run here.

Fast: the wrapper script for real (a held lock, a bad option, relative paths from the caller's
folder, W&B forced offline without a key), the Kubernetes manifest against its schema, the
Dockerfile against the manifest, the crontab and SLURM script, the DAG's exit codes. Slow (``-m
slow``): the DAG loaded by a real Airflow 3 (installed in its own virtualenv, see
docs/retraining.md) and its retrain task run end to end with the project's interpreter.
"""

from __future__ import annotations

import ast
import json
import os
import py_compile
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.domain_registry import available_domains
from pipelines.model_registry import ModelRegistry, RegistryLocked
from pipelines.retrain_steps import ExitCode
from tests.conftest import ROOT, child_env
from tests.processes import run_child

DEPLOY = ROOT / "deploy"


def test_locked_exit_is_immediate_and_the_wrapper_maps_exit_codes(tmp_path):
    registry = ModelRegistry(tmp_path / "registry", "healthcare")
    # PYTHON is a wrapper that records what the retrain process sees, then runs the real interpreter
    spy = tmp_path / "python"
    spy.write_text(f'#!/bin/sh\necho "$WANDB_MODE $PWD" > {tmp_path}/seen\nexec {sys.executable} "$@"\n')
    spy.chmod(0o755)
    env = child_env(PYTHON=str(spy), WANDB_MODE="online")
    env.pop("WANDB_API_KEY", None)
    env["HOME"] = str(tmp_path)  # no ~/.netrc key either
    wrapper = [str(DEPLOY / "retrain.sh"), "healthcare", "--registry", "registry"]  # relative: the caller's folder
    with registry.lock():
        started = time.time()
        held = run_child(wrapper, 120, cwd=tmp_path, env=env)
        elapsed = time.time() - started
    assert held.returncode == 0 and "locked" in held.stdout and "(exit 5)" in held.stdout, held.stderr[-2000:]
    assert elapsed < 30, f"a locked retrain must exit at once, took {elapsed:.1f} s"
    assert (tmp_path / "seen").read_text().split() == ["offline", str(tmp_path)], "no key: offline; no cd into the checkout"
    assert "no W&B API key" in held.stderr
    with pytest.raises(RegistryLocked), registry.lock(), registry.lock():
        pass
    bad = run_child([*wrapper, "--floor", "auroc=high"], 120, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "--floor" in bad.stderr
    typo = run_child([*wrapper, "--floor", "test/aucroc>=0.5"], 120, cwd=tmp_path, env=env)
    assert typo.returncode == 2 and "test/aucroc" in typo.stderr and "test/auroc" in typo.stderr
    assert not (ROOT / "registry").exists() and not (ROOT / "runs").exists(), "nothing may land in the checkout"


def test_kubernetes_cronjob_manifest_and_its_image():
    documents = list(yaml.safe_load_all((DEPLOY / "k8s-cronjob.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in documents}
    cronjob, claim = kinds["CronJob"], kinds["PersistentVolumeClaim"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    job = cronjob["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]] == [claim["metadata"]["name"]]
    container = pod["containers"][0]
    mount = container["volumeMounts"][0]["mountPath"]
    for option in ("--registry=", "--runs_dir=", "--data.npz_path="):
        value = next(a for a in container["args"] if a.startswith(option)).split("=", 1)[1]
        assert value.startswith(mount + "/"), f"{option} must live on the persistent volume"
    assert container["workingDir"] == mount, "relative paths and stray files go to the volume, not the image"
    assert container["command"] == ["/app/deploy/retrain.sh"] and container["args"][0] in available_domains()
    assert any(a.startswith("--keep=") for a in container["args"]), "retention: the volume must not fill up"
    env = {e["name"]: e for e in container["env"]}
    assert "WANDB_MODE" not in env, "online W&B only with a key: retrain.sh decides"
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
    rule = job["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [int(ExitCode.USAGE)]

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"-t {container['image']} " in dockerfile, "the Dockerfile builds the image the CronJob names"
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which the repository lacks"
    assert "COPY deploy deploy" in dockerfile and "WORKDIR /app" in dockerfile, "the image has /app/deploy/retrain.sh"
    kubernetes_validate = pytest.importorskip("kubernetes_validate")  # the real schema check, when installed
    for document in documents:
        kubernetes_validate.validate(document, "1.31", strict=True)


def test_shell_examples_parse_and_use_the_exit_codes():
    for script in ("retrain.sh", "retrain.sbatch"):
        subprocess.run(["bash", "-n", str(DEPLOY / script)], check=True)
        assert os.access(DEPLOY / script, os.X_OK), f"{script} must be executable"
    sbatch = (DEPLOY / "retrain.sbatch").read_text()
    assert "#SBATCH --requeue" in sbatch and "srun" in sbatch
    output = re.search(r"#SBATCH --output=(\S+)", sbatch).group(1)
    assert "/" not in output or output.startswith("/"), "SLURM does not create the folder of --output: a relative subfolder fails the job"
    wrapper = (DEPLOY / "retrain.sh").read_text()
    assert not re.search(r"^\s*cd ", wrapper, re.M), "retrain.sh must not change into the checkout"
    for code in (ExitCode.PROMOTED, ExitCode.KEPT_CHAMPION, ExitCode.NOTHING_NEW, ExitCode.LOCKED):
        assert f"\n  {int(code)}) outcome=" in wrapper, f"retrain.sh does not handle exit code {int(code)} ({code.name})"
    assert f"\n  {int(ExitCode.USAGE)}) " in wrapper and "exit 2" in wrapper
    fine = "|".join(str(int(c)) for c in (ExitCode.PROMOTED, ExitCode.KEPT_CHAMPION, ExitCode.NOTHING_NEW, ExitCode.LOCKED))
    assert f"  {fine}) " in sbatch
    entries = [line for line in (DEPLOY / "crontab").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert entries
    for entry in entries:
        fields = entry.split(None, 5)
        ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
        for field, (low, high) in zip(fields[:5], ranges):
            for part in field.replace("*/", "").split(","):
                assert part == "*" or low <= int(part.split("-")[0]) <= high, f"bad crontab field {field!r}"
        assert "deploy/retrain.sh" in fields[5]
        log = re.search(r">> (\S+)", fields[5]).group(1)
        assert f"mkdir -p {Path(log).parent} &&" in fields[5], "the log folder is created before cron appends to it"
        subprocess.run(["bash", "-n", "-c", fields[5]], check=True)


def test_airflow_dag_compiles_and_matches_the_exit_codes(tmp_path):
    path = DEPLOY / "airflow_retrain_dag.py"
    py_compile.compile(str(path), cfile=str(tmp_path / "dag.pyc"), doraise=True)
    tree = ast.parse(path.read_text())
    assigned = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple):
            assigned.update(zip([t.id for t in node.targets[0].elts], [v.value for v in node.value.elts]))
    assert assigned == {code.name: int(code) for code in ExitCode}
    source = path.read_text()
    assert "sys.executable" not in source and "/srv/" not in source.split('"""', 2)[2], "the project's own interpreter and paths from Variables"


def shared_data(relative: str) -> Path:
    """A real data set from ../shared/data (beside the project, or beside the folder of clones)."""
    for base in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data"):
        if (base / relative).exists():
            return base / relative
    pytest.skip(f"{relative} is absent: real data sets live in ../shared/data beside the project")


def airflow_python() -> str:
    python = os.environ.get("AIRFLOW_PYTHON")
    if not python or not Path(python).is_file():
        pytest.skip("set AIRFLOW_PYTHON to the interpreter of a virtualenv with apache-airflow (docs/retraining.md)")
    return python


@pytest.mark.slow
def test_airflow_loads_the_dag_and_its_retrain_task_branches_on_a_real_retrain(tmp_path):
    python = airflow_python()
    data = shared_data("healthcare/breastmnist.npz")
    home = tmp_path / "airflow"
    env = {**child_env(), "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    env.pop("PYTHONPATH")  # Airflow's interpreter imports nothing from the project
    load = (
        "import json, sys\ntry:\n from airflow.dag_processing.dagbag import DagBag\nexcept ImportError:\n from airflow.models.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DEPLOY / 'airflow_retrain_dag.py')!r})\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()}, 'dags': {d: sorted(bag.dags[d].task_ids) for d in bag.dags}}))"
    )
    loaded = run_child([python, "-c", load], 300, env=env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["errors"] == {} and result["dags"] == {"retrain_healthcare": ["announce_promotion", "nothing_to_do", "report_rejection", "retrain"]}
    settings = {
        "DOMAIN_PIPELINES_PYTHON": sys.executable, "DOMAIN_PIPELINES_REGISTRY": str(tmp_path / "registry"),
        "DOMAIN_PIPELINES_RUNS": str(tmp_path / "runs"), "DOMAIN_PIPELINES_DATA": str(data), "PYTHONPATH": str(ROOT),
        "DOMAIN_PIPELINES_OPTIONS": "--trainer.max_epochs=1 --trainer.limit_train_batches=2 --trainer.limit_val_batches=1 --model.network=resnet10 --model.width=0.25 --data.augment=null",
    }  # fmt: skip
    run = f"import sys; sys.path.insert(0, {str(DEPLOY)!r}); import airflow_retrain_dag as d; print('NEXT', d.retrain_and_branch())"
    outcomes = []
    for _ in range(2):
        done = run_child([python, "-c", run], 600, env={**env, **settings})
        assert done.returncode == 0, done.stderr[-3000:]
        outcomes.append(done.stdout.split("NEXT ")[-1].strip())
    assert outcomes[0] in ("announce_promotion", "report_rejection") and outcomes[1] == "nothing_to_do", outcomes
    registry = ModelRegistry(tmp_path / "registry", "healthcare")
    assert registry.versions() == ["v0001"] and registry.verify() == []
