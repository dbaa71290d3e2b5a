"""Airflow DAG: nightly retraining of one domain, branching on ``pipelines.retrain``'s exit code.

The project runs in **its own environment**: every task starts the project's interpreter (its
virtualenv's ``python``, where ``pip install -e .`` put the project) as a child process, so
Airflow's environment needs nothing from the project and keeps its own pins. Settings come from
Airflow Variables, else environment variables of the worker, read when the task runs (not when the
DAG file is parsed)::

    airflow variables set domain_pipelines_python /srv/domain-pipelines/.venv/bin/python
    airflow variables set domain_pipelines_registry /srv/models/registry
    airflow variables set domain_pipelines_runs /srv/models/runs
    airflow variables set domain_pipelines_data /srv/data/healthcare/latest.npz   # overwritten daily

    airflow variables set domain_pipelines_options "--trainer.max_epochs=30"         # optional extra options

(or ``DOMAIN_PIPELINES_PYTHON``, ``DOMAIN_PIPELINES_REGISTRY``, ``DOMAIN_PIPELINES_RUNS``,
``DOMAIN_PIPELINES_DATA``, ``DOMAIN_PIPELINES_OPTIONS`` in the worker's environment). The evaluation set is a snapshot the
registry owns, so the data file may be refreshed every day. W&B is offline unless the worker has
``WANDB_API_KEY``.

    retrain --(0 promoted)------> announce_promotion (prints the new champion's metadata)
            --(3 kept champion)-> report_rejection  (prints the history table)
            --(4 nothing new)---> nothing_to_do
            --(5 locked)--------> nothing_to_do     (another retrain of the domain is running)
            --(1 failed)--------> the task fails and Airflow retries it (``retries``)
            --(2 bad usage)-----> the task fails without retries (AirflowFailException)

``max_active_runs=1`` keeps Airflow from overlapping runs; the registry's lock covers everything
else (manual runs, other schedulers). Checked with Airflow 3.3.2 (``tests/test_deploy.py``, slow).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from datetime import datetime, timedelta

from airflow import DAG
from airflow.exceptions import AirflowException, AirflowFailException

try:  # Airflow 3
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.providers.standard.operators.python import BranchPythonOperator, PythonOperator
except ImportError:  # Airflow 2
    from airflow.operators.empty import EmptyOperator
    from airflow.operators.python import BranchPythonOperator, PythonOperator

DOMAIN = "healthcare"
RETRAIN_OPTIONS = ["--warm_start", "--margin", "0.005", "--floor", "test/auroc>=0.8", "--keep", "14"]
DATA_OPTION = "--data.npz_path"  # the domain's option that names the (rolling) training file

# pipelines.retrain_steps.ExitCode (the test suite checks that these match)
PROMOTED, FAILED, USAGE, KEPT_CHAMPION, NOTHING_NEW, LOCKED = 0, 1, 2, 3, 4, 5
NEXT_TASK = {PROMOTED: "announce_promotion", KEPT_CHAMPION: "report_rejection", NOTHING_NEW: "nothing_to_do", LOCKED: "nothing_to_do"}


def setting(name: str, required: bool = True) -> str:
    """Airflow Variable ``domain_pipelines_<name>``, else ``$DOMAIN_PIPELINES_<NAME>``; a clear error if neither."""
    fallback = os.environ.get(f"DOMAIN_PIPELINES_{name.upper()}")
    key = f"domain_pipelines_{name}"
    try:
        try:
            from airflow.sdk import Variable  # Airflow 3

            value = Variable.get(key, default=fallback)
        except ImportError:
            from airflow.models import Variable  # Airflow 2

            value = Variable.get(key, default_var=fallback)
    except Exception:  # noqa: BLE001 - no metadata database or API (e.g. outside a task): the environment decides
        value = fallback
    if not value and required:
        raise AirflowFailException(f"set the Airflow Variable domain_pipelines_{name} (or DOMAIN_PIPELINES_{name.upper()} on the worker)")
    return value or ""


def project(*args: str) -> int:
    """Run ``<project python> -m ARGS`` in the project's environment; return its exit code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    if not env.get("WANDB_API_KEY"):
        env["WANDB_MODE"] = "offline"
    command = [setting("python"), "-m", *args]
    print("running", " ".join(command), flush=True)
    return subprocess.run(command, env=env).returncode


def retrain_and_branch() -> str:
    """Run one retraining attempt; return the id of the task to follow (Airflow branching)."""
    code = project(
        "pipelines.retrain", DOMAIN, "--registry", setting("registry"), "--runs_dir", setting("runs"),
        *RETRAIN_OPTIONS, DATA_OPTION, setting("data"), *shlex.split(setting("options", required=False)),
    )  # fmt: skip
    if code in NEXT_TASK:
        return NEXT_TASK[code]
    if code == USAGE:
        raise AirflowFailException(f"pipelines.retrain {DOMAIN}: bad command line (exit {code}); fix the DAG, retrying will not help")
    raise AirflowException(f"pipelines.retrain {DOMAIN} failed (exit {code}); Airflow retries it")


def registry_command(command: str) -> None:
    code = project("pipelines.registry", DOMAIN, command, "--registry", setting("registry"))
    if code != 0:
        raise AirflowException(f"pipelines.registry {DOMAIN} {command} exited {code}")


with DAG(
    dag_id=f"retrain_{DOMAIN}",
    schedule="17 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=15)},
    tags=["domain-pipelines", "retrain", DOMAIN],
) as dag:
    retrain = BranchPythonOperator(task_id="retrain", python_callable=retrain_and_branch)
    announce = PythonOperator(task_id="announce_promotion", python_callable=registry_command, op_args=["show"])
    rejected = PythonOperator(task_id="report_rejection", python_callable=registry_command, op_args=["list"])
    idle = EmptyOperator(task_id="nothing_to_do")
    retrain >> [announce, rejected, idle]
