"""``predict`` and ``test`` with ``--ckpt_path`` need the checkpoint and the new data only: the files a
model was trained on may move or be deleted (issue 22). One contract over every registered domain."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.domain_registry import available_domains, get_domain
from tests.conftest import only_run, read_jsonl, run_pipeline
from tests.medical_files import blob_images, write_png


def finance_files(folder: Path, name: str, seed: int) -> list[str]:
    from domains.finance.synthetic import make_card_transactions

    table = make_card_transactions(700, fraud_rate=0.08, seed=seed)
    table.to_csv(folder / f"{name}.csv", index=False)
    if name == "score":
        table.drop(columns=["is_fraud"]).to_csv(folder / "score.csv", index=False)
        return ["--data.predict_path", str(folder / "score.csv")]
    return ["--data.path", str(folder / f"{name}.csv")]


def autonomous_files(folder: Path, name: str, seed: int) -> list[str]:
    from domains.autonomous.simulator import simulate_vehicles

    simulate_vehicles(60, 40, 0.25, seed).to_csv(folder / f"{name}.csv", index=False)
    return ["--data.predict_path" if name == "score" else "--data.path", str(folder / f"{name}.csv")]


def healthcare_files(folder: Path, name: str, seed: int) -> list[str]:
    images, labels = blob_images(40, 16, seed)
    names = np.array(["normal", "lesion"])[labels]
    rows = [(str(write_png(folder / name / f"{i}.png", image).relative_to(folder)), label) for i, (image, label) in enumerate(zip(images, names))]
    if name == "score":
        return ["--data.predict_dir", str(folder / name)]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(folder / f"{name}.csv", index=False)
    return ["--data.labels_csv", str(folder / f"{name}.csv")]


def media_files(folder: Path, name: str, seed: int) -> list[str]:
    from domains.media.readers import synthetic_images

    images = synthetic_images(120, 16, seed)
    np.savez(folder / f"{name}.npz", images=images.pixels, labels=images.labels)
    return [] if name == "score" else ["--data.npz_path", str(folder / f"{name}.npz")]  # predict generates: no input


#: per domain: write ``train`` (the training source), ``eval`` (labelled data to test on) or ``score``
#: (data to predict on) into a folder and return the options that name it
FILES: dict[str, Callable[[Path, str, int], list[str]]] = {
    "finance": finance_files, "autonomous": autonomous_files, "healthcare": healthcare_files, "media": media_files,
}  # fmt: skip


def test_every_domain_says_how_to_write_its_files():
    assert set(FILES) == set(available_domains())


@pytest.mark.parametrize("domain", available_domains())
def test_predict_and_test_need_only_the_checkpoint_and_the_new_data(domain, tmp_path, runs_dir):
    spec, write = get_domain(domain), FILES[domain]
    training, new = tmp_path / "training", tmp_path / "new"
    training.mkdir(), new.mkdir()
    run_pipeline(domain, "fit", *spec.test_args, *write(training, "train", 0), "--runs_dir", str(runs_dir))
    run = only_run(runs_dir, domain)
    shutil.rmtree(training)  # the training files are gone; the run's config.yaml still names them

    common = ["--runs_dir", str(runs_dir), "--run_id", run.name, "--ckpt_path", "best"]
    run_pipeline(domain, "predict", *common, *write(new, "score", 1))
    predictions = pd.read_csv(run / "predictions.csv")
    assert len(predictions) > 0
    # batches go to the file as they come; Lightning keeps none of them (flat memory: benchmarks/scaling.py)
    assert yaml.safe_load((run / "config-predict.yaml").read_text())["return_predictions"] is False

    run_pipeline(domain, "test", *common, *write(new, "eval", 2), "--trainer.limit_test_batches=2")
    tested = [row for row in read_jsonl(run / "metrics.jsonl") if row["stage"] == "test"]
    assert len(tested) == 1 and any(np.isfinite(value) for key, value in tested[0].items() if key.startswith("test/"))
    assert not training.exists()
