"""A drain that times out is an honest stop: ``python -m pipelines.serve`` exits 3 and says requests were cut.

A real server (a tiny untrained diffusion bundle, slow seed requests served one at a time) gets a
real SIGTERM while requests are in flight and ``--drain_timeout 0.5`` cannot answer them all.
"""

from __future__ import annotations

import signal
import threading
import time

from pipelines.export import export_checkpoint
from pipelines.domain_registry import get_domain
from tests.helpers import metric_samples, request, start_server, tiny_diffusion


def test_drain_timeout_cuts_requests_and_exits_3(tmp_path):
    _, ckpt = tiny_diffusion(tmp_path)
    bundle = export_checkpoint(get_domain("media"), ckpt, "onnx", tmp_path / "bundle")
    served = start_server("media", bundle, tmp_path / "server.log", "--max_batch_size", "1", "--drain_timeout", "0.5")
    try:
        answers: list[int] = []

        def client(seed: int) -> None:
            try:
                # the most work a request may ask (count x steps = MAX_EVALUATIONS): a fast machine answered all ten
                # 4 x 100-step requests within the 0.5 s drain (exit 0), so the cut was not reached
                answers.append(request(served.url + "/predict", {"seed": seed, "count": 16, "steps": 100})[0])
            except OSError:
                answers.append(-1)  # the connection was cut

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(10)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while metric_samples(served.url).get("pipelines_serve_in_flight_requests", 0) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric_samples(served.url)["pipelines_serve_in_flight_requests"] >= 5, "the requests must be in flight (gauge)"
        code = served.stop(signal.SIGTERM, timeout=60)
        for thread in threads:
            thread.join(60)
    finally:
        served.kill()  # it and every process it started, whatever happened (a no-op after a clean stop)
    log = served.output()
    assert code == 3, log
    assert "requests in flight were cut" in log and "--drain_timeout 0.5" in log, log
    assert any(status != 200 for status in answers), answers
