"""Drift against the training distribution without the training files: reference statistics in the
checkpoint and the bundle, the server's request log, ``pipelines.monitor`` on it and its report.

A real finance run (``pipelines.run finance fit`` on a written ADBench-style file) and its real
export; a real server logs real requests (rows as a client sends them) to a rotating request log;
the training file is deleted; the monitor then compares the log with the statistics in the bundle
(and in the checkpoint): traffic like the training data passes (exit 0), traffic whose first four
features moved by +0.3 standard deviations is flagged on exactly those (exit 3), with a report.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.export import export_checkpoint
from pipelines.reference import QUANTILE_POINTS, find_in_checkpoint, load_reference
from pipelines.domain_registry import get_domain
from pipelines.request_log import RequestLog, log_files, read_log
from tests.conftest import run_pipeline
from tests.helpers import FAST, predict_with_headers, request, start_champion_server, start_server, write_night

SHIFTED = ["x0", "x1", "x2", "x3"]


def rows_of(seed: int, count: int, shift: float = 0.0) -> list[dict[str, float]]:
    """Rows like night 1's normal traffic (``write_night``), the first four features moved by ``shift``."""
    values = np.random.default_rng(seed).normal(0.05, 1.0, size=(count, 12))
    values[:, :4] += shift
    return [{f"x{j}": round(float(v), 4) for j, v in enumerate(row)} for row in values]


def monitor(*args: str) -> subprocess.CompletedProcess:
    """``python -m pipelines.monitor ARGS`` run in this process (its exit status as a real process is
    tested in tests/test_monitor.py; here another interpreter would only repeat the imports)."""
    from pipelines.monitor import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as stop:  # a usage error
            code = stop.code
    return subprocess.CompletedProcess(["python", "-m", "pipelines.monitor", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drift")
    data = root / "train.npz"
    write_night(data, 1, rows=3000)
    run_pipeline("finance", "fit", "--runs_dir", str(root / "runs"), "--run_id", "night1", *FAST, "--data.path", str(data))
    ckpt = root / "runs" / "finance" / "night1" / "checkpoints" / "last.ckpt"
    bundle = export_checkpoint(get_domain("finance"), ckpt, "onnx", root / "bundle")
    return {"root": root, "data": data, "ckpt": ckpt, "bundle": bundle}


def test_checkpoint_and_bundle_carry_the_training_splits_statistics(trained):
    import torch

    from domains.finance.data import TransactionDataModule

    checkpoint = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    in_checkpoint = find_in_checkpoint(checkpoint)
    in_bundle = load_reference(trained["bundle"])
    assert in_checkpoint == in_bundle == load_reference(trained["ckpt"])
    metadata = json.loads((trained["bundle"] / "metadata.json").read_text())
    assert in_bundle["input"] == "numeric" and in_bundle["columns"] == metadata["domain_metadata"]["feature_names"]
    # the statistics are those of the training split's preprocessed features (what the bundle's model takes), nothing else
    hparams = {k: v for k, v in checkpoint["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    train = TransactionDataModule(**hparams)._split("train").numeric.numpy()
    for j, column in enumerate(in_bundle["columns"]):
        feature = in_bundle["features"][column]
        assert feature["count"] == len(train) and len(feature["quantiles"]) == QUANTILE_POINTS
        np.testing.assert_allclose(feature["quantiles"][100], np.median(train[:, j]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(feature["mean"], train[:, j].mean(), rtol=1e-4, atol=1e-6)
    assert "training split" in in_bundle["source"]


def send(url: str, seeds: range, shift: float = 0.0) -> None:
    for seed in seeds:
        status, answer = request(url + "/predict", {"rows": rows_of(seed, 100, shift)})
        assert status == 200, answer


def test_request_log_and_monitor_flag_a_shift_against_the_bundle(trained, tmp_path, capsys):
    log, reports = tmp_path / "requests.jsonl", tmp_path / "reports"
    served = start_server("finance", trained["bundle"], tmp_path / "server.log", "--request_log", str(log), "--request_log_max_mb", "0.25", "--request_log_keep", "20")
    try:
        send(served.url, range(15))
        trained["data"].unlink()  # from here on drift is measured without the training files
        calm = monitor(str(trained["bundle"]), str(log), "--last", "1500", "--report", str(reports))
        assert calm.returncode == 0, calm.stdout + calm.stderr
        with open(log, "ab") as handle:  # what a kill in the middle of a write leaves
            handle.write(b'{"time": "2026-11-30T10:00:00", "model": "fin')
        send(served.url, range(100, 115), shift=0.3)
        moved = monitor(str(trained["bundle"]), str(log), "--last", "1500", "--report", str(reports), "--json", str(tmp_path / "moved.json"))
        from_checkpoint = monitor(str(trained["ckpt"]), str(log), "--last", "1500", "--json", str(tmp_path / "ckpt.json"))
        assert served.stop() == 0, served.output()
    finally:
        served.kill()  # it and every process it started, whatever happened (a no-op after a clean stop)
    assert moved.returncode == 3, moved.stdout + moved.stderr
    report = json.loads((tmp_path / "moved.json").read_text())
    assert sorted(report["drifted"]) == SHIFTED, report["drifted"]
    assert report == {**json.loads((tmp_path / "ckpt.json").read_text()), "reference": report["reference"], "written_at": report["written_at"]}
    assert from_checkpoint.returncode == 3

    files = log_files(log)
    assert len(files) >= 3, f"0.25 MB per file must rotate: {files}"
    frame, skipped = read_log(log)
    assert (len(frame), skipped) == (3000, 1), "every answered row logged once, the cut line skipped and nothing else lost"
    sha = json.loads((trained["bundle"] / "metadata.json").read_text())["source_checkpoint"]["sha256"]
    assert set(frame["version"]) == {f"sha256-{sha[:12]}"} and frame["output.score"].notna().all()

    folders = sorted(reports.iterdir())
    assert [f.name.startswith("monitor-") for f in folders] == [True, True], folders
    calm_md, moved_md = ((f / "report.md").read_text() for f in folders)
    assert calm_md.startswith("# Drift report: no drift") and moved_md.startswith("# Drift report: drift")
    assert all(f"`{name}`" in moved_md.split("\n")[7] for name in SHIFTED), moved_md
    assert (folders[1] / "drift.png").stat().st_size > 10_000 and not list(reports.glob(".*"))

    # features are in the units of the model that answered: another version's records are not compared with this bundle (trial 4)
    from pipelines.monitor import main as monitor_main

    records = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.endswith("}")]
    other, mixed = tmp_path / "other.jsonl", tmp_path / "mixed.jsonl"
    other.write_text("".join(json.dumps({**r, "version": "v0009"}) + "\n" for r in records))
    mixed.write_text("".join(json.dumps({**r, "version": "v0009"} if i % 2 else r) + "\n" for i, r in enumerate(records)))
    capsys.readouterr()
    assert monitor_main([str(trained["bundle"]), str(other), "--only", "drift"]) == 2
    assert "answered by model version 'v0009', not by" in " ".join(capsys.readouterr().err.split())
    assert monitor_main([str(trained["bundle"]), str(mixed), "--only", "drift"]) == 2
    assert "several model versions" in " ".join(capsys.readouterr().err.split())
    assert monitor_main([str(trained["bundle"]), str(mixed), "--only", "drift", "--model_version", f"sha256-{sha[:12]}"]) == 3


def test_request_log_rotation_keeps_whole_lines(tmp_path):
    log = RequestLog(tmp_path / "r.jsonl", max_bytes=2000, keep=2)
    record = {"time": "t", "model": "m", "version": "v", "form": "f", "features": {"a": 1.5}, "outputs": {}}
    for i in range(100):
        log.append([{**record, "features": {"a": float(i)}}])
    files = log_files(tmp_path / "r.jsonl")
    assert [f.name for f in files] == ["r.jsonl.2", "r.jsonl.1", "r.jsonl"]
    assert all(f.stat().st_size <= 2000 for f in files)
    frame, skipped = read_log(tmp_path / "r.jsonl")
    assert skipped == 0 and list(frame["a"]) == [float(i) for i in range(100 - len(frame), 100)], "the newest records, in order"


def test_retrain_when_drift_trains_only_after_the_data_moved_and_the_server_follows(tmp_path, capsys, finance_champion):
    """The loop: serve the champion, log its traffic; --when drift skips calm traffic (4) and retrains on moved traffic.
    The registry starts as a copy of the session's first champion (one real retrain on night 1, tests/conftest.py)."""
    from pipelines.model_registry import ModelRegistry
    from pipelines.retrain import main as retrain_main

    (tmp_path / "runs").mkdir()
    shutil.copytree(finance_champion / "registry", tmp_path / "registry")
    write_night(tmp_path / "latest.npz", 1)
    options = ["--registry", str(tmp_path / "registry"), "--runs_dir", str(tmp_path / "runs"), *FAST, "--data.path", str(tmp_path / "latest.npz")]
    registry = ModelRegistry(tmp_path / "registry", "finance")
    assert registry.champion() == "v0001" and registry.versions() == ["v0001"]
    log = tmp_path / "requests.jsonl"
    gate = ["--when", "drift", "--drift_window", str(log), "--drift_last", "1500"]
    assert retrain_main(["finance", "--when", "drift", *options]) == 2, "--when drift needs a window"

    served = start_champion_server(tmp_path, tmp_path / "server.log", "--reload_interval", "0.5", "--request_log", str(log))
    try:
        send(served.url, range(15))
        assert retrain_main(["finance", *options, *gate]) == 4, "calm traffic: nothing trained"
        assert registry.versions() == ["v0001"]
        send(served.url, range(100, 115), shift=0.3)
        write_night(tmp_path / "latest.npz", 6)  # the refreshed training export that came with the moved traffic
        code = retrain_main(["finance", *options, *gate, "--drift_report", str(tmp_path / "reports")])
        assert code in (0, 3) and registry.versions() == ["v0001", "v0002"], code
        report = next((tmp_path / "reports").iterdir()) / "report.md"
        assert report.read_text().startswith("# Drift report: drift")
        expected = registry.champion()
        assert expected == ("v0002" if code == 0 else "v0001")
        deadline = time.monotonic() + 180
        while predict_with_headers(served.url, {"rows": rows_of(0, 1)})[1]["x-model-version"] != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        assert predict_with_headers(served.url, {"rows": rows_of(0, 1)})[1]["x-model-version"] == expected, served.output()
        assert served.stop() == 0, served.output()
    finally:
        served.kill()  # it and every process it started, whatever happened (a no-op after a clean stop)
    # a log that none of the champion's answers are in (another model's units) is refused, nothing trained
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**json.loads(line), "version": "v0009"}) + "\n" for line in log.read_text().splitlines() if line.endswith("}")))
    versions = registry.versions()
    capsys.readouterr()
    assert retrain_main(["finance", *options, "--when", "drift", "--drift_window", str(other)]) == 2
    assert f"no records answered by champion {registry.champion()}" in " ".join(capsys.readouterr().err.split())
    assert registry.versions() == versions
    # states a night's wait fixes are not a broken job (trial finding: each was exit 2, "fix the job"): exit 4, nothing trained
    records = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    earlier = next(v for v in versions if v != registry.champion())
    quiet = {
        "empty": ("", "no request records yet (the log is empty)"),
        "after-a-promotion": ("".join(json.dumps({**r, "version": earlier}) + "\n" for r in records), f"no records answered by champion {registry.champion()} yet"),
        "one-record": (json.dumps({**records[0], "version": registry.champion()}) + "\n", "1 record(s) answered by champion"),
    }  # fmt: skip
    for name, (text, message) in quiet.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
        capsys.readouterr()
        assert retrain_main(["finance", *options, "--when", "drift", "--drift_window", str(tmp_path / f"{name}.jsonl")]) == 4, name
        out = " ".join(capsys.readouterr().out.split())
        assert message in out and "nothing trained (exit 4)" in out, (name, out)
    assert registry.versions() == versions


def test_healthcare_intensity_reference_flags_darkened_images(tmp_path):
    """Healthcare fits per-image intensity statistics on its training split (checkpoint and bundle); the request
    log's ``image.mean``/``image.std`` of new images of the same kind pass, the same images darkened are flagged."""
    import torch

    from domains.healthcare.data import MedicalImageDataModule
    from pipelines.request_log import item_features

    spec = get_domain("healthcare")
    tiny = [*spec.test_args, "--data.synthetic_samples=600", "--model.network=resnet10", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--data.augment=null"]
    run_pipeline("healthcare", "fit", "--runs_dir", str(tmp_path / "runs"), "--run_id", "tiny", *tiny)
    ckpt = tmp_path / "runs" / "healthcare" / "tiny" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    stats = find_in_checkpoint(checkpoint)
    assert sorted(stats["features"]) == ["image.mean", "image.std"] and "training split" in stats["source"]
    hparams = {k: v for k, v in checkpoint["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    data = MedicalImageDataModule(**hparams)
    data.setup("fit")
    train = data.datasets["train"].images.astype(np.float64) / (255.0 if data.datasets["train"].images.dtype == np.uint8 else 1.0)
    assert stats["features"]["image.mean"]["count"] == len(train)
    np.testing.assert_allclose(stats["features"]["image.mean"]["mean"], train.reshape(len(train), -1).mean(axis=1).mean(), rtol=1e-6)
    bundle = export_checkpoint(spec, ckpt, "onnx", tmp_path / "bundle")
    assert load_reference(bundle) == stats

    fresh = MedicalImageDataModule(**{**hparams, "synthetic_seed": 1})
    fresh.setup("fit")
    images = np.concatenate([fresh.datasets[name].images for name in ("train", "val", "test")])
    images = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)  # what a client sends: [0, 1]
    from pipelines.serving_server import model_identity

    served = model_identity(json.loads((bundle / "metadata.json").read_text()))["version"]  # what the bundle's server logs
    for name, batch in (("calm", images), ("dark", images * 0.6)):
        log = RequestLog(tmp_path / f"{name}.jsonl")
        log.append([{"time": "t", "model": "healthcare", "version": served, "form": "image", "features": item_features({"image": batch}, i, stats),
                     "outputs": {}} for i in range(len(batch))])  # fmt: skip
    calm = monitor(str(bundle), str(tmp_path / "calm.jsonl"), "--json", str(tmp_path / "calm.json"))
    dark = monitor(str(ckpt), str(tmp_path / "dark.jsonl"), "--json", str(tmp_path / "dark.json"))
    assert calm.returncode == 0, calm.stdout + calm.stderr
    assert dark.returncode == 3 and "image.mean" in json.loads((tmp_path / "dark.json").read_text())["drifted"], dark.stdout


def test_when_drift_with_a_missing_window_is_refused_even_before_the_first_champion(tmp_path, capsys):
    """An empty registry would train the first model: a window that does not exist is still bad input (exit 2), and nothing is trained or written."""
    from pipelines.retrain import main as retrain_main

    registry = tmp_path / "registry"
    code = retrain_main(["finance", "--when", "drift", "--drift_window", str(tmp_path / "nope.jsonl"), "--registry", str(registry), "--runs_dir", str(tmp_path / "runs")])
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (registry / "finance" / "history.jsonl").exists()
