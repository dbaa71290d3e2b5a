"""report.html (pipelines/report.py): every registered domain writes one through the shared hook."""

from __future__ import annotations

import base64
import json
import re

import pytest

from pipelines.domain_registry import available_domains, get_domain
from pipelines.report import REPORT, build_report, limits
from tests.conftest import only_run, run_pipeline


@pytest.mark.parametrize("domain", available_domains())
def test_every_domain_writes_a_report_with_its_metrics_plots_config_and_provenance(domain, runs_dir):
    run_pipeline(domain, *get_domain(domain).test_args, "--runs_dir", str(runs_dir))
    run = only_run(runs_dir, domain)
    text = (run / REPORT).read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for section in ("Data", "Metrics (test)", "Limits", "Config", "Provenance"):
        assert f"<h2>{section}</h2>" in text, section
    for name in summary["test"]:
        assert f"<td>{name}</td>" in text, name  # every test metric is listed
    plots = sorted((run / "plots").glob("*.png"))
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == len(plots) > 0 and base64.b64decode(images[0]).startswith(b"\x89PNG")
    assert summary["best_checkpoint"] in text and json.loads((run / "provenance.json").read_text())["invocations"][0]["git_commit"] in text
    assert not list(run.glob(f".{REPORT}*")), "no partial file is left behind"


def test_limits_name_rare_classes_wide_intervals_and_the_operating_point():
    summary = {"test": {"test/accuracy": 0.9, "test/threshold": 0.3, "test/sensitivity": 0.95, "test/specificity": 0.8},
               "test_intervals": {"test/accuracy": {"low": 0.7, "high": 0.98, "level": 0.95}}}  # fmt: skip
    notes = limits(summary, {"class_balance": {"test": {"benign": 120, "malignant": 7}}})
    assert any("malignant (7)" in n and "benign" not in n for n in notes)
    assert any("test/accuracy (0.7 to 0.98)" in n for n in notes)
    assert any("operating threshold 0.3" in n for n in notes)
    assert any("threshold 0.5" in n for n in limits({"test": {"test/threshold": 0.5, "test/sensitivity": "nan"}}, {}))  # as summary.json stores NaN
    assert limits({}, {}) == ["no test metrics: the run was not tested (python -m pipelines.run DOMAIN test --run_id RUN --ckpt_path best)"]


def test_limits_name_a_calibration_temperature_at_its_bound():
    import torch

    from pipelines.calibration import fit_temperature

    generator = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(4000, generator=generator)
    labels = torch.bernoulli(torch.sigmoid(z), generator=generator)
    noise = torch.bernoulli(torch.full((4000,), 0.5), generator=generator)  # labels the logits say nothing about
    fitted, unfitted = fit_temperature(3 * z, labels), fit_temperature(3 * z, noise)
    assert 2.5 < fitted < 3.5 and unfitted == 100.0, (fitted, unfitted)
    for temperature, named in ((fitted, False), (unfitted, True), (0.05, True)):
        notes = limits({"test": {"test/temperature": temperature, "test/threshold": 0.4995}}, {})
        at_bound = [n for n in notes if "calibration temperature" in n]
        assert bool(at_bound) == named, notes
    assert "upper bound (0.05 to 100)" in limits({"test": {"test/temperature": 100.0, "test/threshold": 0.4995}}, {})[0]
    assert "squeezed towards 0.5" in limits({"test": {"test/temperature": 100.0, "test/threshold": 0.4995}}, {})[0]
    assert "lower bound" in limits({"test": {"test/temperature": 0.05}}, {})[0]


def test_a_report_escapes_what_it_shows(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"test": {"test/<script>": 1.0}}))
    text = build_report(tmp_path, "finance")
    assert "<script>" not in text and "test/&lt;script&gt;" in text
