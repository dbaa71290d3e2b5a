"""``GET /metrics`` reads every server process's metric files (prometheus_client's multi-process mode). A file that a
process has created and not yet sized, or left at 0 bytes when it was killed, made the whole read fail (HTTP 500 from
``/metrics``, seen in the suite while a hot reload started a worker: prometheus/client_python#1199); it holds no values
and is left out. Run in a child interpreter: the multi-process folder is read when prometheus_client is imported."""

from __future__ import annotations

import sys

from tests.conftest import ROOT, child_env
from tests.processes import run_child

SCRIPT = """
import os
from pipelines import serving_metrics
serving_metrics.metrics().requests.labels(code="200").inc(3)
folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
open(os.path.join(folder, "counter_999999.db"), "wb").close()  # a worker's file caught at 0 bytes
body, _ = serving_metrics.render()
print(serving_metrics.total("requests_total"), b'pipelines_serve_requests_total{code="200"} 3.0' in body)
"""


def test_a_metric_file_of_zero_bytes_does_not_fail_the_metrics_read(tmp_path):
    done = run_child([sys.executable, "-c", SCRIPT], 120, cwd=ROOT, env=child_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["3.0", "True"], done.stdout
