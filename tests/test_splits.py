"""Stable, leakage-safe splits (``pipelines/splits.py``) through every domain's real data module, on real files.

Appending rows leaves every earlier row's split unchanged under ``split_by hash`` (and moves some
under the default ``random``, so the check can fail); no key crosses splits; nothing after the
cutoff of ``split_by time`` trains; bad split options are refused naming the column, row or rule;
the rule travels in the checkpoint and ``test --ckpt_path`` uses it.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from domains.autonomous.data import SensorSequenceDataModule
from domains.autonomous.simulator import simulate_vehicles
from domains.finance.data import SYNTHETIC_ROLES, TransactionDataModule
from domains.finance.synthetic import make_card_transactions
from domains.healthcare.data import MedicalImageDataModule
from domains.media.data import MediaDataModule
from pipelines.errors import InputError
from pipelines.domain_registry import get_domain
from pipelines.splits import SplitRule, hash_split
from tests.conftest import only_run, run_pipeline
from tests.medical_files import blob_images, write_png

ROLES = {k: v for k, v in SYNTHETIC_ROLES.items()}
TINY_FINANCE = [*get_domain("finance").test_args, "--data.batch_size=64"]


def finance(path, **options) -> TransactionDataModule:
    return TransactionDataModule(path=str(path), **ROLES, **options)


def flat(message: str) -> str:
    return " ".join(str(message).split())


@pytest.fixture(scope="module")
def transactions() -> pd.DataFrame:
    return make_card_transactions(1500, 0.06, 0)


def test_hash_is_a_keyed_blake2b_stable_across_processes_and_seeds():
    keys = [f"patient-{i}" for i in range(4000)]
    split = hash_split(keys, 0.15, 0.25, seed=0)
    shares = {name: float((split == name).mean()) for name in ("train", "val", "test")}
    assert abs(shares["val"] - 0.15) < 0.03 and abs(shares["test"] - 0.25) < 0.03, shares
    assert list(hash_split(keys[:10], 0.15, 0.25, seed=0)) == list(split[:10])  # depends on the key alone
    assert (hash_split(keys, 0.15, 0.25, seed=1) != split).mean() > 0.2  # the seed salts it
    # a fixed value: the same in every Python process (Python's hash() of a str is salted per process)
    assert list(hash_split(["a", "b", "c", "d", "e"], 0.3, 0.3, seed=0)) == list(hash_split(np.array(["a", "b", "c", "d", "e"]), 0.3, 0.3, 0))


def test_finance_hash_split_keeps_earlier_rows_when_rows_are_appended(tmp_path, transactions):
    transactions.iloc[:1000].to_csv(tmp_path / "day1.csv", index=False)
    transactions.to_csv(tmp_path / "day2.csv", index=False)  # 500 rows appended
    rule = {"split_by": "hash", "split_key": "customer_id"}
    day1, day2 = finance(tmp_path / "day1.csv", **rule).split_assignment, finance(tmp_path / "day2.csv", **rule).split_assignment
    assert (day2[:1000] == day1).all()
    crossing = pd.DataFrame({"key": transactions["customer_id"], "split": day2}).groupby("key")["split"].nunique()
    assert (crossing == 1).all() and set(day2) == {"train", "val", "test"}
    # the default random split moves rows when rows are added: what a stable rule prevents
    moved = finance(tmp_path / "day2.csv").split_assignment[:1000] != finance(tmp_path / "day1.csv").split_assignment
    assert moved.sum() > 100


def test_finance_time_split_trains_on_nothing_after_the_cutoff(tmp_path, transactions):
    transactions.to_csv(tmp_path / "t.csv", index=False)
    times = pd.to_datetime(transactions["timestamp"])
    test_after, val_after = times.quantile(0.75), times.quantile(0.6)
    dm = finance(tmp_path / "t.csv", split_by="time", time_column="timestamp", test_after=str(test_after), val_after=str(val_after))
    split = dm.split_assignment
    assert times[split == "train"].max() <= val_after and times[split == "val"].max() <= test_after < times[split == "test"].min()
    assert (split[(times > test_after).to_numpy()] == "test").all() and val_after < times[split == "val"].min()
    # fractions by time: the latest rows are held back
    split = finance(tmp_path / "t.csv", split_by="time", time_column="timestamp").split_assignment
    assert times[split == "train"].max() < times[split == "val"].min() and times[split == "val"].max() < times[split == "test"].min()
    assert abs((split == "test").mean() - 0.25) < 0.02 and abs((split == "val").mean() - 0.15) < 0.02


def test_bad_split_options_are_refused_naming_the_column_row_or_rule(tmp_path, transactions):
    transactions.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match=r"column 'customer' \(--data.split_key\) not found \(did you mean 'customer_id'"):
        finance(tmp_path / "t.csv", split_by="hash", split_key="customer").split_assignment
    keyless = transactions.copy()
    keyless["customer_id"] = keyless["customer_id"].astype(str)
    keyless.loc[10, "customer_id"] = ""  # an empty cell: the finance reader keeps it as text, not NaN
    keyless.to_csv(tmp_path / "keyless.csv", index=False)
    with pytest.raises(InputError, match=r"keyless.csv row 11, column 'customer_id' \(--data.split_key\): no key value"):
        finance(tmp_path / "keyless.csv", split_by="hash", split_key="customer_id").split_assignment
    bad = transactions.copy()
    bad.loc[6, "timestamp"] = "yesterday"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError) as refused:
        finance(tmp_path / "bad.csv", split_by="time", time_column="timestamp").split_assignment
    assert "bad.csv row 7, column 'timestamp'" in flat(refused.value) and "'yesterday'" in str(refused.value)
    mixed = transactions.copy()  # the timestamp column used only to split (not a feature): the split reads it alone
    mixed["timestamp"] = mixed["timestamp"].astype(str)
    mixed.loc[8, "timestamp"] = mixed.loc[8, "timestamp"].replace(" ", "T") + "+02:00"
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    with pytest.raises(InputError) as refused:
        roles = {**ROLES, "timestamp_columns": [], "ignore_columns": ["timestamp"]}
        TransactionDataModule(path=str(tmp_path / "mixed.csv"), split_by="time", time_column="timestamp", **roles).split_assignment
    assert "mixed.csv, column 'timestamp' (--data.time_column): row 9 holds a time with a time zone" in flat(refused.value) and "row 1 one without" in flat(refused.value)
    with pytest.raises(InputError) as refused:
        finance(tmp_path / "t.csv", split_by="time", time_column="timestamp", test_after="2099-01-01").split_assignment
    assert re.search(r"split 'test' is empty under --data.split_by time --data.time_column timestamp --data.test_after 2099-01-01 .*'test': 0", flat(refused.value))
    for options, expected in (
        ({"split_key": "customer_id"}, "is used by --data.split_by hash"),
        ({"split_by": "hash"}, "needs --data.split_key"),
        ({"split_by": "time", "time_column": "timestamp", "val_after": "2024-03-05"}, "--data.val_after needs --data.test_after"),
        ({"test_after": "2024-03-05"}, "cutoffs of --data.split_by time"),
    ):
        with pytest.raises(InputError, match=re.escape(expected)):
            finance(tmp_path / "t.csv", **options)


def test_finance_split_column_needs_no_role(tmp_path, transactions):
    frame = transactions.assign(split=np.where(np.arange(len(transactions)) % 5 == 0, "test", np.where(np.arange(len(transactions)) % 5 == 1, "val", "train")))
    frame.to_csv(tmp_path / "t.csv", index=False)
    dm = finance(tmp_path / "t.csv", split_column="split")
    assert dm.split_rule.by == "column" and (dm.split_assignment == frame["split"].to_numpy()).all()
    assert dm.num_numeric > 0  # the split column is no feature and needs no --data.ignore_columns


def sequences(vehicles: int) -> pd.DataFrame:
    return simulate_vehicles(vehicles, 40, 0.25, 0, 0.0)


def autonomous(path, **options) -> SensorSequenceDataModule:
    return SensorSequenceDataModule(path=str(path), channels=["speed", "yaw_rate"], target_channels=["x", "y"], observe=4, predict=4, **options)


def test_autonomous_hash_split_by_vehicle_is_stable_and_time_split_holds_back_the_future(tmp_path):
    table = sequences(60)
    first = table[table["sequence"].isin(sorted(table["sequence"].unique())[:40])]
    first.to_csv(tmp_path / "day1.csv", index=False)
    table.to_csv(tmp_path / "day2.csv", index=False)
    day1, day2 = (autonomous(tmp_path / f"{d}.csv", split_by="hash").tables for d in ("day1", "day2"))
    where = {name: set(day1[name]["sequence"]) for name in day1}
    for name, frame in day2.items():
        earlier = set(frame["sequence"]) & set(first["sequence"])
        assert earlier == where[name]  # every earlier vehicle is where it was
    assert not set.intersection(*(set(frame["sequence"]) for frame in day2.values()))

    # time split on the time column: nothing after the cutoff trains (sequences are cut there)
    dm = autonomous(tmp_path / "day2.csv", split_by="time", test_after="6.5", val_after="4.0")
    tables = dm.tables
    assert tables["train"]["time"].max() <= 4.0 and tables["val"]["time"].between(4.0, 6.5, inclusive="right").all() and tables["test"]["time"].min() > 6.5
    assert len(dm.windows["train"].rows) and len(dm.windows["test"].rows)


def test_autonomous_split_column_value_is_refused_with_its_row(tmp_path):
    table = sequences(6).assign(split="train")
    table.loc[4, "split"] = "holdout"
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError) as refused:
        autonomous(tmp_path / "t.csv", split_column="split").tables
    assert "t.csv row 5, column 'split'" in flat(refused.value) and "'holdout'" in str(refused.value)
    with pytest.raises(InputError, match="leave-one-scene-out"):  # ETH/UCY's split is its own: a rule is refused, not ignored
        SensorSequenceDataModule(eth_ucy_root=str(tmp_path), channels=[], target_channels=["x", "y"], split_by="hash")


def write_image_csv(folder, patients: int, per_patient: int = 3, split=None):
    images, labels = blob_images(patients * per_patient, 16)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        write_png(folder / f"img{i:04d}.png", image)
        rows.append({"path": f"img{i:04d}.png", "label": ["benign", "malignant"][label], "patient_id": f"P{i // per_patient:03d}"})
    frame = pd.DataFrame(rows)
    if split is not None:
        frame["split"] = split(frame)
    return frame


def test_healthcare_hash_by_patient_keeps_a_patient_together_and_group_column_catches_a_leak(tmp_path):
    frame = write_image_csv(tmp_path, 40)
    frame.iloc[:90].to_csv(tmp_path / "day1.csv", index=False)
    frame.to_csv(tmp_path / "day2.csv", index=False)
    options = {"split_by": "hash", "split_key": "patient_id", "group_column": "patient_id", "val_fraction": 0.2, "test_fraction": 0.2}
    day1 = MedicalImageDataModule(labels_csv=str(tmp_path / "day1.csv"), **options).split_assignment
    day2 = MedicalImageDataModule(labels_csv=str(tmp_path / "day2.csv"), **options).split_assignment
    assert (day2[:90] == day1).all() and set(day2) == {"train", "val", "test"}
    assert (pd.DataFrame({"p": frame["patient_id"], "s": day2}).groupby("p")["s"].nunique() == 1).all()
    # an official split column that puts one patient's images in train and test is refused
    frame.assign(split=["train", "val", "test"] * 40).to_csv(tmp_path / "leaky.csv", index=False)
    with pytest.raises(InputError, match=r"value\(s\) of 'patient_id' have rows in more than one split"):
        MedicalImageDataModule(labels_csv=str(tmp_path / "leaky.csv"), group_column="patient_id").split_assignment
    with pytest.raises(InputError, match=r"did you mean 'patient_id'"):
        MedicalImageDataModule(labels_csv=str(tmp_path / "day2.csv"), split_by="hash", split_key="patient").split_assignment


def test_media_hash_split_by_file_stem_is_stable(tmp_path):
    images, _ = blob_images(60, 16)
    for i, image in enumerate(images):
        write_png(tmp_path / "day2" / ["a", "b"][i % 2] / f"im{i:03d}.png", np.repeat(image[..., None], 3, -1))
        if i < 45:
            write_png(tmp_path / "day1" / ["a", "b"][i % 2] / f"im{i:03d}.png", np.repeat(image[..., None], 3, -1))

    def placed(folder):
        dm = MediaDataModule(image_dir=str(tmp_path / folder), image_size=16, split_by="hash", val_fraction=0.2, test_fraction=0.2, max_eval_images=None)
        return {dm.source.names[i].rsplit("/", 1)[-1]: name for name, indices in dm.split_indices.items() for i in indices}

    day1, day2 = placed("day1"), placed("day2")
    assert len(day2) == 60 and all(day2[name] == split for name, split in day1.items())
    with pytest.raises(InputError, match="image_dir"):
        MediaDataModule(split_by="hash")


def test_split_rule_is_saved_in_the_checkpoint_and_used_by_test(tmp_path, transactions, capsys):
    transactions.to_csv(tmp_path / "t.csv", index=False)
    runs = tmp_path / "runs"
    data = ["--data.path", str(tmp_path / "t.csv"), *TINY_FINANCE, "--runs_dir", str(runs)]
    run_pipeline("finance", "fit", *data, "--data.split_by=hash", "--data.split_key=customer_id")
    run = only_run(runs, "finance")
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    saved = checkpoint["TransactionDataModule"]["split_rule"]
    assert SplitRule.from_dict(saved) == SplitRule("hash", key="customer_id", val_fraction=0.15, test_fraction=0.25)
    capsys.readouterr()
    # test with the checkpoint elsewhere and no split options: the checkpoint's rule is used
    run_pipeline("finance", "test", *data, "--run_id", "elsewhere", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"))
    assert "the checkpoint's split: --data.split_by hash --data.split_key customer_id" in capsys.readouterr().err
    assert json.loads((runs / "finance" / "elsewhere" / "summary.json").read_text())["test"]["test/auroc"] > 0
    # another explicit rule could test on training rows: refused before anything runs
    with pytest.raises(SystemExit) as refused:
        run_pipeline("finance", "test", *data, "--run_id", "other", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"), "--data.split_seed=3")
    message = flat(capsys.readouterr().err)
    assert refused.value.code == 2 and "trained with the split --data.split_by hash" in message and "seed 3" in message


def test_retrain_scores_a_stable_split_on_the_grown_files_test_split_and_refuses_another_rule(tmp_path, transactions):
    """``pipelines.evaluation_set.for_attempt`` with a real registry and real files (no training: the
    scoring itself is the runner's ``test``, tested elsewhere)."""
    from pipelines.evaluation_set import for_attempt, snapshot
    from pipelines.model_registry import ModelRegistry
    from pipelines.retrain_steps import ExitCode, RetrainError, resolve_config

    latest = tmp_path / "latest.csv"
    transactions.iloc[:1000].to_csv(latest, index=False)
    hashed = ["--data.path", str(latest), "--data.split_by=hash", "--data.split_key=customer_id"]
    data = resolve_config("finance", hashed)["data"]
    registry = ModelRegistry(tmp_path / "registry", "finance")
    registry.pin_evaluation(snapshot(registry, data))  # what the first promotion pins
    pinned = registry.evaluation()
    night1_test = finance(pinned["data"]["path"], split_by="hash", split_key="customer_id").split_assignment == "test"

    transactions.to_csv(latest, index=False)  # the next night: the file grew
    record = for_attempt(registry, pinned, resolve_config("finance", hashed)["data"])
    assert record["fingerprint"] != pinned["fingerprint"] and registry.evaluation() == pinned  # scored on tonight's data, pin kept
    night2_test = finance(record["data"]["path"], split_by="hash", split_key="customer_id").split_assignment == "test"
    assert night2_test[:1000].tolist() == night1_test.tolist() and night2_test[1000:].any()  # earlier test rows stay, new ones join

    with pytest.raises(RetrainError) as refused:  # the default random split could train on the held-back rows
        for_attempt(registry, pinned, resolve_config("finance", ["--data.path", str(latest)])["data"])
    assert refused.value.code == ExitCode.USAGE and "repin" in str(refused.value)
    # a random split's pin stays the frozen snapshot, as before
    random_pin = snapshot(registry, resolve_config("finance", ["--data.path", str(latest)])["data"])
    assert for_attempt(registry, random_pin, resolve_config("finance", ["--data.path", str(latest)])["data"]) is random_pin
