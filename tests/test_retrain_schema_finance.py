"""What a finance retrain compares (``DomainSpec.schema_options``, ``pipelines/retrain_schema.py``): the columns the
model reads, in their roles, the label and each timestamp column's kind; not the id or ignored columns (a new-user
trial: a night whose export gained an ignored ``memo`` column was refused, and a night whose timestamps gained a time
zone trained a challenger that its evaluation then refused). Read on real CSVs as training reads them; no training."""

from __future__ import annotations

from pathlib import Path

import yaml

from domains.finance.synthetic import make_card_transactions
from pipelines.domain_registry import get_domain
from pipelines.retrain_schema import data_schema, differences

SPEC = get_domain("finance")
CONFIG = yaml.safe_load((Path(__file__).parents[1] / "domains" / "finance" / "config.yaml").read_text())["data"]


def schema(folder: Path, name: str, edit=None, **options) -> dict:
    frame = make_card_transactions(400, fraud_rate=0.05, seed=0)
    if edit is not None:
        edit(frame)
    frame.to_csv(folder / name, index=False)
    data = {key: value for key, value in CONFIG.items() if not key.startswith("synthetic")}
    return data_schema(SPEC, {**data, "path": str(folder / name), **options})


def test_ignored_and_id_columns_may_change_but_the_timestamp_kind_may_not(tmp_path):
    champion = schema(tmp_path, "night1.csv")
    assert champion["preprocessor.timestamp_zones"] == {"timestamp": "naive"}

    def add_memo(frame):
        frame["memo"] = "note"

    assert differences(champion, schema(tmp_path, "memo.csv", add_memo, ignore_columns=["memo"])) == []
    assert differences(champion, schema(tmp_path, "ids.csv", id_columns=["transaction_id"], ignore_columns=["customer_id"])) == []

    def utc(frame):
        frame["timestamp"] = frame["timestamp"].astype(str).str.replace(" ", "T") + "Z"

    found = differences(champion, schema(tmp_path, "zoned.csv", utc))
    assert found == ["preprocessor.timestamp_zones.timestamp: champion 'naive', this data 'zoned'"], found
    found = differences(champion, schema(tmp_path, "fewer.csv", numeric_columns=["distance_from_home_km", "customer_age"], ignore_columns=["transactions_last_hour"]))
    assert len(found) == 1 and found[0].startswith("preprocessor.roles.numeric_columns: champion") and "(missing here: ['transactions_last_hour'])" in found[0], found


def test_a_night_whose_labels_are_other_classes_is_refused_naming_them(tmp_path, capsys):
    """``preprocessor.label_classes`` on a real champion: a night labelled ``legit``/``fraud`` (read with its own
    ``--data.label_classes``) and a night with ``[1, 0]`` (normal and fraud swapped: every score would mean the opposite)
    are refused before training, naming the classes; a night holding a label value outside the classes is left to the
    training, which refuses it naming the value and its row (a failed attempt). Nothing is promoted."""
    from pipelines.model_registry import ModelRegistry
    from pipelines.retrain import main as retrain_main
    from pipelines.retrain_steps import ExitCode

    frame = make_card_transactions(600, fraud_rate=0.05, seed=0)
    frame.to_csv(tmp_path / "night1.csv", index=False)
    frame.assign(is_fraud=frame["is_fraud"].map({0: "legit", 1: "fraud"})).to_csv(tmp_path / "words.csv", index=False)
    frame.assign(is_fraud=frame["is_fraud"].where(frame.index != 7, 2)).to_csv(tmp_path / "three.csv", index=False)
    tiny = [arg for arg in SPEC.test_args if not arg.startswith("--data.synthetic")]
    command = ["finance", "--registry", str(tmp_path / "registry"), "--runs_dir", str(tmp_path / "runs"), *tiny, "--trainer.logger=false"]
    assert retrain_main([*command, "--data.path", str(tmp_path / "night1.csv")]) == ExitCode.PROMOTED
    trained = sorted(p.name for p in (tmp_path / "runs" / "finance").iterdir())
    capsys.readouterr()

    assert retrain_main([*command, "--data.path", str(tmp_path / "words.csv"), "--data.label_classes=[legit,fraud]"]) == ExitCode.USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "preprocessor.label_classes: champion ['0', '1'], this data ['legit', 'fraud'] (not known to the champion: ['legit', 'fraud'])" in err, err[-3000:]
    assert retrain_main([*command, "--data.path", str(tmp_path / "night1.csv"), "--data.label_classes=[1,0]"]) == ExitCode.USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "preprocessor.label_classes: champion ['0', '1'], this data ['1', '0'] (the same entries in another order)" in err, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "finance").iterdir()) == trained, "nothing was trained for the refused nights"

    assert retrain_main([*command, "--data.path", str(tmp_path / "three.csv")]) not in (ExitCode.PROMOTED, ExitCode.USAGE)
    err = " ".join(capsys.readouterr().err.split())
    assert "'2' first at data row(s) 8" in err, err[-3000:]
    registry = ModelRegistry(tmp_path / "registry", "finance")
    assert registry.versions() == ["v0001"] and registry.champion() == "v0001"
