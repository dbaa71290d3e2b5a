"""Airflow DAG: nightly retraining of one domain, branching on ``pipelines.retrain``'s exit code.

Copy this file into the DAGs folder of an Airflow (2.7+ or 3) deployment whose workers can run the
project (``PROJECT_DIR`` below, or the ``DOMAIN_PIPELINES_DIR`` variable) and reach the registry.

    retrain --(0 promoted)------> announce_promotion (prints the new champion's metadata)
            --(3 kept champion)-> report_rejection  (prints the history table)
            --(4 nothing new)---> nothing_to_do
            --(5 locked)--------> nothing_to_do     (another retrain of the domain is running)
            --(1 failed)--------> the task fails and Airflow retries it (``retries``)
            --(2 bad usage)-----> the task fails without retries (AirflowFailException)

``max_active_runs=1`` keeps Airflow from overlapping runs; the registry's lock covers everything
else (manual runs, other schedulers).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta

from airflow import DAG
from airflow.exceptions import AirflowException, AirflowFailException

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.providers.standard.operators.python import BranchPythonOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator
    from airflow.operators.empty import EmptyOperator
    from airflow.operators.python import BranchPythonOperator

DOMAIN = "healthcare"
PROJECT_DIR = os.environ.get("DOMAIN_PIPELINES_DIR", "/srv/domain-pipelines")
REGISTRY = os.environ.get("PIPELINES_REGISTRY", "/srv/models/registry")
RETRAIN_ARGS = [
    "--registry", REGISTRY, "--runs_dir", "/srv/models/runs", "--warm_start", "--margin", "0.005",
    "--floor", "test/auroc>=0.8", "--data.npz_path", "/srv/data/healthcare/latest.npz",
]  # fmt: skip

# pipelines.retrain.ExitCode (the test suite checks that these match)
PROMOTED, FAILED, USAGE, KEPT_CHAMPION, NOTHING_NEW, LOCKED = 0, 1, 2, 3, 4, 5
NEXT_TASK = {PROMOTED: "announce_promotion", KEPT_CHAMPION: "report_rejection", NOTHING_NEW: "nothing_to_do", LOCKED: "nothing_to_do"}


def retrain_and_branch() -> str:
    """Run one retraining attempt; return the id of the task to follow (Airflow branching)."""
    command = [sys.executable, "-m", "pipelines.retrain", DOMAIN, *RETRAIN_ARGS]
    code = subprocess.run(command, cwd=PROJECT_DIR).returncode
    if code in NEXT_TASK:
        return NEXT_TASK[code]
    if code == USAGE:
        raise AirflowFailException(f"{' '.join(command)}: bad command line (exit {code}); fix the DAG, retrying will not help")
    raise AirflowException(f"{' '.join(command)} failed (exit {code}); Airflow retries it")


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
    announce = BashOperator(
        task_id="announce_promotion", bash_command=f"cd {PROJECT_DIR} && python -m pipelines.registry {DOMAIN} show --registry {REGISTRY}"
    )
    rejected = BashOperator(
        task_id="report_rejection", bash_command=f"cd {PROJECT_DIR} && python -m pipelines.registry {DOMAIN} list --registry {REGISTRY}"
    )
    idle = EmptyOperator(task_id="nothing_to_do")
    retrain >> [announce, rejected, idle]
