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
