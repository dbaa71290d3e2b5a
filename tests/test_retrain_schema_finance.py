"""What a finance retrain compares (``DomainSpec.schema_options``, ``pipelines/retrain_schema.py``): the columns the
model reads, in their roles, the label and each timestamp column's kind; not the id or ignored columns (a new-user
trial: a night whose export gained an ignored ``memo`` column was refused, and a night whose timestamps gained a time
zone trained a challenger that its evaluation then refused). Read on real CSVs as training reads them; no training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from domains.finance.synthetic import make_card_transactions
from pipelines.domain_registry import get_domain
from pipelines.errors import InputError
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


def test_a_night_whose_labels_are_other_classes_differs_naming_them(tmp_path):
    """``preprocessor.label_classes``: a night labelled ``legit``/``fraud`` (read with its own ``--data.label_classes``)
    and a night with ``[1, 0]`` (normal and fraud swapped: every score would mean the opposite) differ from the champion,
    naming the classes, so ``pipelines.retrain`` refuses them before training (exit 2, as for every difference:
    tests/test_retrain_schema.py). A night holding a label value outside the classes is refused as reading it for
    training refuses it, naming the value and its row. Read as training reads the files; no training (a real retrain costs minutes)."""
    champion = schema(tmp_path, "night1.csv")
    assert champion["preprocessor.label_classes"] == ["0", "1"], champion

    def words(frame):
        frame["is_fraud"] = frame["is_fraud"].map({0: "legit", 1: "fraud"})

    found = differences(champion, schema(tmp_path, "words.csv", words, label_classes=["legit", "fraud"]))
    assert found == ["preprocessor.label_classes: champion ['0', '1'], this data ['legit', 'fraud'] (not known to the champion: ['legit', 'fraud']) (missing here: ['0', '1'])"], found
    found = differences(champion, schema(tmp_path, "swapped.csv", label_classes=[1, 0]))
    assert found == ["preprocessor.label_classes: champion ['0', '1'], this data ['1', '0'] (the same entries in another order)"], found

    def three(frame):
        frame.loc[7, "is_fraud"] = 2

    with pytest.raises(InputError, match=r"label '2' \(1 row\) is not one of the declared classes \['0', '1'\].*'2' first at data row\(s\) 8"):
        schema(tmp_path, "three.csv", three)
