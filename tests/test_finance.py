"""Finance: real CSV/Parquet/.npz files written in each test, real Trainer runs, every bad input."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from domains.finance.data import SYNTHETIC_ROLES, ScoringStream, TransactionDataModule
from domains.finance.model import best_f1_threshold, budget_threshold
from domains.finance.preprocessing import UNKNOWN, ColumnRoles, TablePreprocessor, robust_scale
from domains.finance.synthetic import make_card_transactions
from tests.conftest import ROOT, child_env, only_run, run_pipeline, shared_file
from tests.processes import run_child

TINY = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--data.batch_size=64", "--model.hidden_dims=[16]", "--model.latent_dim=4"]


def write_transactions(path: Path, rows: int = 600, seed: int = 0) -> pd.DataFrame:
    frame = make_card_transactions(rows, fraud_rate=0.05, seed=seed)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return frame


def datamodule(path: Path, **overrides) -> TransactionDataModule:
    return TransactionDataModule(path=str(path), **{**SYNTHETIC_ROLES, **overrides})


# ----- synthetic data, preprocessing --------------------------------------------------------------
def test_synthetic_transactions_are_deterministic_with_injected_fraud_patterns():
    a, b = make_card_transactions(3000, 0.03, seed=5), make_card_transactions(3000, 0.03, seed=5)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(make_card_transactions(3000, 0.03, seed=6))
    fraud, normal = a[a.is_fraud == 1], a[a.is_fraud == 0]
    assert len(fraud) == 90
    hours = pd.to_datetime(a.timestamp).dt.hour
    assert (hours[fraud.index].between(1, 4)).mean() > 3 * (hours[normal.index].between(1, 4)).mean()  # odd hours
    assert (fraud.transactions_last_hour >= 6).mean() > 0.3 > (normal.transactions_last_hour >= 6).mean()  # card testing bursts
    assert fraud.amount.median() > normal.amount.median()


def test_preprocessing_roles_unknown_slot_and_weights_only_round_trip(tmp_path):
    frame = make_card_transactions(400, 0.05, seed=1)
    roles = ColumnRoles(**SYNTHETIC_ROLES)
    pre = TablePreprocessor(roles, "onehot", max_categories=50).fit(frame, "train.csv")
    assert "transaction_id" not in pre.group_names and "customer_id" not in pre.group_names  # ids dropped
    assert {"timestamp.hour", "timestamp.weekday", "merchant_category", "amount"} <= set(pre.group_names)
    encoded = pre.transform(frame, "train.csv")
    amount = encoded["numeric"][:, pre.numeric_feature_names.index("amount")]
    logged = np.log1p(frame.amount.to_numpy())
    center, scale = robust_scale(logged)
    assert scale > 0.5 * logged.std()  # not silenced: comparable to the plain standard deviation
    assert np.allclose(amount, (logged - center) / scale, atol=1e-4)  # log-scaled, robustly scaled

    new = frame.head(3).copy()
    new["merchant_category"] = ["spaceship_dealer", "grocery", None]
    new.loc[0, "amount"] = np.nan  # imputed, never dropped
    out = pre.transform(new, "new.csv")
    unknown = pre.numeric_feature_names.index(f"merchant_category={UNKNOWN}")
    assert out["numeric"].shape[0] == 3 and out["numeric"][0, unknown] == 1.0 and out["numeric"][1, unknown] == 0.0

    torch.save({"pre": pre.state_dict()}, tmp_path / "state.pt")
    restored = TablePreprocessor.from_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["pre"])
    again = restored.transform(new, "new.csv")
    assert np.array_equal(again["numeric"], out["numeric"]) and restored.group_names == pre.group_names

    embedded = TablePreprocessor(roles, "embedding").fit(frame, "train.csv")
    codes = embedded.transform(new, "new.csv")["categorical"]
    assert codes.shape == (3, 3) and codes[0, 0] == 0 and codes[1, 0] > 0  # index 0 = unknown


def test_thresholds():
    scores = torch.tensor([0.1, 0.2, 0.3, 5.0, 6.0, 0.4, 0.25, 7.0, 0.15, 0.35])
    labels = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1, 0, 0])
    threshold, f1 = best_f1_threshold(scores, labels)
    assert threshold == 5.0 and f1 == 1.0
    assert budget_threshold(scores, 0.2) == 6.0 and budget_threshold(scores, 0.001) == 7.0


def test_csv_and_parquet_give_the_same_features(tmp_path):
    write_transactions(tmp_path / "t.csv")
    write_transactions(tmp_path / "t.parquet")
    csv, parquet = datamodule(tmp_path / "t.csv"), datamodule(tmp_path / "t.parquet")
    assert csv.feature_groups == parquet.feature_groups and csv.num_numeric == parquet.num_numeric
    a, b = csv._split("val"), parquet._split("val")
    assert torch.allclose(a.numeric, b.numeric, atol=1e-5) and torch.equal(a.label, b.label)


def write_npz(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, 6))
    y = np.zeros(400, dtype=np.int64)
    y[:40] = 1
    x[:40] += 4.0
    np.savez(path, X=x, y=y)


def test_npz_semi_supervised_and_unsupervised_splits(tmp_path):
    write_npz(tmp_path / "a.npz")
    semi = TransactionDataModule(path=str(tmp_path / "a.npz"), mode="semi_supervised", val_fraction=0.1, test_fraction=0.4, split_seed=3)
    assert semi.num_numeric == 6 and semi.feature_groups == [f"x{i}" for i in range(6)]
    split, labels = semi.split_assignment, semi.labels
    assert (labels[split == "train"] == 0).all() and (split == "train").sum() == 180  # half the normals
    assert (labels[split != "train"] == 1).sum() == 40  # every anomaly is held out
    assert np.array_equal(split, TransactionDataModule(path=str(tmp_path / "a.npz"), val_fraction=0.1, test_fraction=0.4, split_seed=3).split_assignment)
    assert not np.array_equal(split, TransactionDataModule(path=str(tmp_path / "a.npz"), val_fraction=0.1, test_fraction=0.4, split_seed=4).split_assignment)
    unsup = TransactionDataModule(path=str(tmp_path / "a.npz"), mode="unsupervised", split_seed=3)
    train = unsup.split_assignment == "train"
    assert unsup.labels[train].sum() == 24 and bool(unsup._split("train").fit_rows.all())  # anomalies train too (stratified)


def test_real_campaign_npz_loads():
    path = shared_file("finance/campaign.npz")
    dm = TransactionDataModule(path=str(path), val_fraction=0.1, test_fraction=0.4)
    assert dm.num_numeric == 62 and len(dm.table) == 41188 and int(dm.labels.sum()) == 4640
    assert (dm.labels[dm.split_assignment == "train"] == 0).all()


# ----- bad input ------------------------------------------------------------------------------------
def _fit_error(tmp_path: Path, frame: pd.DataFrame, **overrides) -> str:
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(ValueError) as info:
        datamodule(path, **overrides).num_numeric
    return str(info.value)


def test_bad_input_missing_configured_column(tmp_path):
    message = _fit_error(tmp_path, make_card_transactions(300, 0.05).drop(columns=["country"]))
    assert "'country'" in message and "categorical_columns" in message and "missing" in message


def test_bad_input_categorical_with_one_value(tmp_path):
    frame = make_card_transactions(300, 0.05)
    frame["channel"] = "pos"
    message = _fit_error(tmp_path, frame)
    assert "'channel'" in message and "only one value" in message


def test_bad_input_non_numeric_values_report_count_and_rows(tmp_path):
    frame = make_card_transactions(300, 0.05)
    frame["amount"] = frame["amount"].astype(object)
    frame.loc[[4, 9, 200, 250], "amount"] = ["12,50", "abc", "n/a?", "$5"]
    message = _fit_error(tmp_path, frame)
    assert "'amount'" in message and "4 non-numeric" in message and "row(s) 5, 10, 201, 251 " in message  # 1-based file rows


def test_bad_input_all_nan_column(tmp_path):
    frame = make_card_transactions(300, 0.05)
    frame["customer_age"] = np.nan
    message = _fit_error(tmp_path, frame)
    assert "'customer_age'" in message and "empty" in message


def test_bad_input_label_with_a_third_class(tmp_path):
    frame = make_card_transactions(300, 0.05)
    frame["is_fraud"] = frame["is_fraud"].astype(object)
    frame.loc[7, "is_fraud"] = "maybe"
    message = _fit_error(tmp_path, frame)
    assert "'is_fraud'" in message and "'maybe'" in message and "row(s) 8" in message


def test_bad_input_semi_supervised_without_labels(tmp_path):
    message = _fit_error(tmp_path, make_card_transactions(300, 0.05), label_column=None)
    assert "semi_supervised" in message and "label_column" in message


# ----- real Trainer runs ----------------------------------------------------------------------------
def test_vae_with_embeddings_on_csv_fit_test_and_chunked_predict(tmp_path):
    runs = tmp_path / "runs"
    write_transactions(tmp_path / "train.csv", rows=800)
    scoring = make_card_transactions(130, 0.1, seed=9)
    scoring.loc[3, "merchant_category"] = "never_seen_before"
    scoring.loc[5, "amount"] = np.nan
    scoring = scoring.drop(columns=["is_fraud"])  # the label is optional when scoring
    scoring.to_csv(tmp_path / "score.csv", index=False)
    common = ["--data.path", str(tmp_path / "train.csv"), "--model.architecture=vae", "--data.categorical_encoding=embedding", *TINY]
    run_pipeline("finance", *common, "--runs_dir", str(runs))
    run = only_run(runs, "finance")
    summary = json.loads((run / "summary.json").read_text())
    assert {"test/auroc", "test/auprc", "test/precision_at_budget", "test/recall_at_budget"} <= set(summary["test"])
    assert (run / "plots/test_score_histogram.png").stat().st_size > 5000 and (run / "plots/test_pr_curve.png").is_file()

    # the fitted preprocessing and the calibrated threshold travel in the checkpoint (weights only)
    checkpoint = torch.load(run / "checkpoints/best.ckpt", weights_only=True, map_location="cpu")
    saved = TablePreprocessor.from_state_dict(checkpoint["TransactionDataModule"]["preprocessor"])
    assert saved.categorical_encoding == "embedding" and saved.vocabularies == datamodule(tmp_path / "train.csv").fit_preprocessor().vocabularies
    threshold = float(checkpoint["state_dict"]["threshold"])
    assert np.isfinite(threshold)

    outputs = {}
    for chunk in (7, 1000):
        run_pipeline("finance", "predict", *common, "--runs_dir", str(runs), "--run_id", run.name, "--ckpt_path", "best",
                     "--data.predict_path", str(tmp_path / "score.csv"), f"--data.predict_chunk_rows={chunk}")  # fmt: skip
        outputs[chunk] = pd.read_csv(run / "predictions.csv", dtype={"transaction_id": str})
    out = outputs[7]
    assert len(out) == 130 and out["transaction_id"].tolist() == scoring["transaction_id"].tolist()  # every row, in order
    assert out["source_row"].tolist() == list(range(130))
    assert np.allclose(out["score"], outputs[1000]["score"], rtol=1e-5)  # chunking does not change scores
    outside = out["out_of_range"].fillna("") != ""  # values beyond the training range are alerted whatever their score
    assert (out["is_alert"] == ((out["score"] >= threshold) | outside)).all()
    assert set(out["top_feature_1"]) <= set(saved.group_names) and (out["top_contribution_1"] >= out["top_contribution_2"]).all()
    assert np.isfinite(out.loc[5, "score"])  # a missing amount is imputed, the row is kept


def test_unsupervised_parquet_without_labels(tmp_path):
    runs = tmp_path / "runs"
    frame = make_card_transactions(600, 0.05, seed=2).drop(columns=["is_fraud"])
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    frame.head(50).to_parquet(tmp_path / "new.parquet", index=False)
    args = ["--data.path", str(tmp_path / "t.parquet"), "--data.mode=unsupervised", "--data.label_column=null", *TINY, "--runs_dir", str(runs)]
    run_pipeline("finance", *args, "--model.target_alert_rate=0.1")
    run = only_run(runs, "finance")
    test = json.loads((run / "summary.json").read_text())["test"]
    assert "test/auroc" not in test and 0.02 < test["test/alert_rate"] < 0.3  # the budget threshold, no labels
    run_pipeline("finance", "predict", *args, "--run_id", run.name, "--ckpt_path", "best", "--data.predict_path", str(tmp_path / "new.parquet"))
    out = pd.read_parquet(tmp_path / "new.parquet")
    predicted = pd.read_csv(run / "predictions.csv")
    assert len(predicted) == 50 and np.allclose(predicted["amount"], out["amount"]) and predicted["is_alert"].dtype == bool


def test_scoring_reuses_the_saved_preprocessing_and_rejects_bad_files(tmp_path, capsys):
    runs = tmp_path / "runs"
    train = write_transactions(tmp_path / "train.csv", rows=500)
    args = ["--data.path", str(tmp_path / "train.csv"), *TINY, "--runs_dir", str(runs)]
    run_pipeline("finance", "fit", *args)
    run = only_run(runs, "finance")
    predict = ["predict", *args, "--run_id", run.name, "--ckpt_path", "last"]

    make_card_transactions(60, 0.1, seed=4).to_csv(tmp_path / "new.csv", index=False)
    run_pipeline("finance", *predict, "--data.predict_path", str(tmp_path / "new.csv"))
    before = pd.read_csv(run / "predictions.csv")["score"]
    # a refit on the changed training file would scale amounts differently: scoring must not refit
    train.assign(amount=train.amount * 50, distance_from_home_km=train.distance_from_home_km * 7).to_csv(tmp_path / "train.csv", index=False)
    run_pipeline("finance", *predict, "--data.predict_path", str(tmp_path / "new.csv"))
    assert np.allclose(pd.read_csv(run / "predictions.csv")["score"], before, rtol=1e-6)

    renamed = make_card_transactions(40, 0.1, seed=3).rename(columns={"country": "nation"})
    renamed.to_csv(tmp_path / "renamed.csv", index=False)
    with pytest.raises(SystemExit) as refused:
        run_pipeline("finance", *predict, "--data.predict_path", str(tmp_path / "renamed.csv"))
    assert refused.value.code == 2 and re.search(r"columns differ from training.*missing \['country'\].*unexpected \['nation'\]", " ".join(capsys.readouterr().err.split()))

    bad = make_card_transactions(40, 0.1, seed=3)
    bad["distance_from_home_km"] = bad["distance_from_home_km"].astype(object)
    bad.loc[33, "distance_from_home_km"] = "far away"
    bad.to_csv(tmp_path / "bad_rows.csv", index=False)
    with pytest.raises(SystemExit) as refused:
        run_pipeline("finance", *predict, "--data.predict_path", str(tmp_path / "bad_rows.csv"), "--data.predict_chunk_rows=10")
    assert refused.value.code == 2 and re.search(r"'distance_from_home_km'.*1 non-numeric.*row\(s\) 34 ", " ".join(capsys.readouterr().err.split()))


def test_scoring_stream_reads_in_bounded_chunks_and_keeps_every_row(tmp_path):
    frame = write_transactions(tmp_path / "t.csv", rows=230)
    dm = datamodule(tmp_path / "t.csv")
    stream = ScoringStream(tmp_path / "t.csv", "t.csv", dm.fitted, chunk_rows=50)
    chunks = list(stream)
    assert [len(c["row"]) for c in chunks] == [50, 50, 50, 50, 30]
    assert sum((c["raw"]["transaction_id"].tolist() for c in chunks), []) == frame["transaction_id"].tolist()


def test_running_finance_does_not_import_monai(tmp_path):
    """(transformers is not checked: torchmetrics itself imports it whenever it is installed.)"""
    code = (
        "import sys; from pipelines.run import main; "
        f"main(['finance', *{TINY!r}, '--data.synthetic_rows=400', '--runs_dir', {str(tmp_path / 'runs')!r}]); "
        "print([m for m in sys.modules if m.split('.')[0] in ('monai', 'albumentations', 'pydicom', 'nibabel')])"
    )
    result = run_child([sys.executable, "-c", code], 240, cwd=ROOT, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_bad_input_unparseable_timestamp_and_boolean_rows(tmp_path):
    frame = make_card_transactions(300, 0.05)
    frame.loc[11, "timestamp"] = "yesterday-ish"
    message = _fit_error(tmp_path, frame)
    assert "'timestamp'" in message and "1 other value" in message and "ISO 8601" in message and "row(s) 12 " in message
    frame = make_card_transactions(300, 0.05)
    frame["card_present"] = frame["card_present"].astype(object)
    frame.loc[[2, 3], "card_present"] = "sometimes"
    message = _fit_error(tmp_path, frame)
    assert "'card_present'" in message and "2 other value(s)" in message and "row(s) 3, 4 " in message


# ----- export and serving -------------------------------------------------------------------------
def json_rows(frame: pd.DataFrame) -> list[dict]:
    """Rows as a client sends them: JSON values (timestamps as text, missing values as null)."""
    text = frame.assign(timestamp=frame["timestamp"].astype(str)).astype(object)
    return json.loads(json.dumps(text.where(text.notna(), None).to_dict("records")))


def serve_batch(adapter, requests: list[dict], run) -> tuple[list, dict[str, np.ndarray]]:
    """What the server does with one batch of requests of one form: decode each, one ``infer`` on the
    concatenated arrays, ``encode`` each request's share (an answer, or the HTTPException refusing it);
    also the model inputs that ``run`` was given."""
    from fastapi import HTTPException

    decoded = [adapter.decode(request) for request in requests]
    seen: dict[str, np.ndarray] = {}

    def recording(**inputs):
        seen.update(inputs)
        return run(**inputs)

    outputs = adapter.infer({name: np.concatenate([d[name] for d in decoded]) for name in decoded[0]}, recording)
    answers, start = [], 0
    for d in decoded:
        rows = len(next(iter(d.values())))
        try:
            answers.append(adapter.encode({name: values[start : start + rows] for name, values in outputs.items()}))
        except HTTPException as error:
            answers.append(error)
        start += rows
    return answers, seen


@pytest.fixture(scope="module", params=[("autoencoder", "onehot"), ("vae", "embedding")], ids=["ae-onehot", "vae-embedding"])
def exported(request, tmp_path_factory):
    """A tiny model trained on a CSV table, its checkpoint and its ONNX bundle."""
    from pipelines.domain_registry import get_domain
    from pipelines.export import export_checkpoint

    architecture, encoding = request.param
    folder = tmp_path_factory.mktemp(f"finance-{architecture}")
    write_transactions(folder / "train.csv", rows=800)
    run_pipeline("finance", "fit", "--data.path", str(folder / "train.csv"), f"--model.architecture={architecture}",
                 f"--data.categorical_encoding={encoding}", *TINY, "--runs_dir", str(folder / "runs"))  # fmt: skip
    ckpt = only_run(folder / "runs", "finance") / "checkpoints" / "last.ckpt"
    return ckpt, export_checkpoint(get_domain("finance"), ckpt, "onnx", folder / "bundle")


def scoring_rows(tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """New rows (an unseen category, missing values) as a frame and as the CSV text ``predict`` reads."""
    frame = make_card_transactions(60, 0.1, seed=9).drop(columns=["is_fraud"])
    frame.loc[3, "merchant_category"] = "never_seen_before"
    frame.loc[5, "amount"] = np.nan
    frame["card_present"] = frame["card_present"].astype(object)
    frame.loc[6, "card_present"] = None
    frame.to_csv(tmp_path / "score.csv", index=False)
    return frame, pd.read_csv(tmp_path / "score.csv", dtype=str, keep_default_na=False)


def test_served_rows_are_prepared_and_scored_exactly_as_the_checkpoint_scores_them(exported, tmp_path):
    from domains.finance.serving import TransactionRowAdapter, TransactionRowsAdapter
    from pipelines.bundle_runtime import Bundle
    from pipelines.domain_registry import get_domain
    from pipelines.export import load_task

    ckpt, bundle_path = exported
    bundle = Bundle(bundle_path)
    meta = bundle.metadata["domain_metadata"]
    task, state, _ = load_task(get_domain("finance"), ckpt)
    saved = TablePreprocessor.from_state_dict(state["preprocessor"])
    assert json.loads(json.dumps(meta["preprocessing_state"])) == meta["preprocessing_state"] and meta["feature_names"] == saved.numeric_feature_names
    assert meta["threshold"] == float(task.threshold) and meta["contribution_names"] == saved.group_names

    frame, csv_text = scoring_rows(tmp_path)
    adapter = TransactionRowsAdapter(bundle.metadata)
    (answer,), inputs = serve_batch(adapter, [{"rows": json_rows(frame)}], bundle.run)
    training = saved.transform(csv_text, "score.csv")  # what `predict` encodes from the same rows in a CSV file
    np.testing.assert_array_equal(inputs["numeric"], training["numeric"])
    assert ("categorical" in inputs) == (saved.categorical_encoding == "embedding")
    if "categorical" in inputs:
        np.testing.assert_array_equal(inputs["categorical"], training["categorical"])
        assert inputs["categorical"][3, 0] == 0  # the unseen merchant category -> <unknown>
    else:
        assert inputs["numeric"][3, saved.numeric_feature_names.index(f"merchant_category={UNKNOWN}")] == 1.0

    outputs = bundle.run(**inputs)
    with torch.no_grad():
        score, contributions = task.score({k: torch.from_numpy(v) for k, v in training.items()})
    np.testing.assert_allclose(outputs["score"], score.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs["contributions"], contributions.numpy(), rtol=1e-5, atol=1e-5)
    clear = np.abs(score.double().numpy() - float(task.threshold)) > 1e-4 * max(1.0, abs(float(task.threshold)))
    np.testing.assert_array_equal(outputs["is_alert"][clear], (score.double() >= task.threshold).numpy()[clear])

    top = contributions.topk(task.hparams.top_features, dim=1).indices
    assert [[f["feature"] for f in p["top_features"]] for p in answer["predictions"]] == [[saved.group_names[j] for j in row] for row in top.tolist()]
    assert [p["score"] for p in answer["predictions"]] == pytest.approx(outputs["score"].tolist(), rel=1e-6)
    # a batch of single-row requests is prepared in one pass and answers each exactly as alone
    single = TransactionRowAdapter(bundle.metadata)
    ones, batched = serve_batch(single, [{"row": row} for row in json_rows(frame)], bundle.run)
    np.testing.assert_array_equal(batched["numeric"], training["numeric"])
    for one, reference in zip(ones, answer["predictions"]):
        assert one["score"] == pytest.approx(reference["score"], rel=1e-5) and one["is_alert"] == reference["is_alert"]


def test_served_rows_are_validated_naming_row_and_column(exported):
    from fastapi import HTTPException

    from domains.finance.serving import TransactionRowAdapter, TransactionRowsAdapter
    from pipelines.bundle_runtime import Bundle

    metadata = Bundle(exported[1]).metadata
    rows, row = TransactionRowsAdapter(metadata), TransactionRowAdapter(metadata)
    good = json_rows(make_card_transactions(30, 0.1, seed=4).drop(columns=["is_fraud"]))[:3]

    def edited(index: int, **changes) -> list[dict]:
        out = [dict(r) for r in good]
        out[index].update(changes)
        return out

    without_amount = [dict(r) for r in good]
    del without_amount[2]["amount"]
    cases = [
        ({"rows": without_amount}, "rows[2].amount: missing column (amount_columns)"),
        ({"rows": edited(1, distance_from_home_km="far away")}, "rows[1].distance_from_home_km: expected a number (numeric_columns); got 'far away'"),
        ({"rows": edited(0, amount=True)}, "rows[0].amount: expected a number"),
        ({"rows": edited(2, card_present="sometimes")}, "rows[2].card_present: expected a boolean"),
        ({"rows": edited(1, timestamp="yesterday-ish")}, "rows[1].timestamp: expected a timestamp"),
        ({"rows": edited(0, channel=["online"])}, "rows[0].channel: expected a single value"),
        ({"rows": edited(1, nation="FR")}, "rows[1].nation: unknown column"),
        ({"rows": [good[0], 7]}, "rows[1]: expected an object"),
        ({"rows": []}, "rows: expected a non-empty list"),
        ({"rows": good, "threshold": 1}, "threshold: unexpected field"),
        ({"row": {**good[0], "amount": "12,5"}}, "row.amount: expected a number"),
    ]
    bundle = Bundle(exported[1])
    for request, message in cases:  # refused by decode (structure) or, alone in its batch, by encode (values)
        adapter = row if "row" in request else rows
        with pytest.raises(HTTPException) as caught:
            answers, _ = serve_batch(adapter, [{"row": good[0]} if adapter is row else {"rows": good}, request], bundle.run)
            assert not isinstance(answers[0], HTTPException), answers[0]  # the good request of the batch is answered
            raise answers[1]
        assert caught.value.status_code == 422 and message in caught.value.detail, (message, caught.value.detail)

    # ids and the label may be sent; null is a missing value (imputed as in training); timestamps in mixed formats parse
    mixed = edited(0, is_fraud=1, amount=None, timestamp="2024-03-05T10:00:00Z")
    _, inputs = serve_batch(rows, [{"rows": mixed}], bundle.run)
    numeric = inputs["numeric"]
    assert numeric.shape == (3, len(metadata["domain_metadata"]["feature_names"])) and np.isfinite(numeric).all()
    np.testing.assert_array_equal(numeric[1:], serve_batch(rows, [{"rows": good[1:]}], bundle.run)[1]["numeric"])


def test_rows_form_over_http(exported, tmp_path):
    """The real server answers the rows and row forms (equal to the bundle) and refuses a bad row with a 422."""
    import signal

    from domains.finance.serving import TransactionRowsAdapter
    from pipelines.bundle_runtime import Bundle
    from tests.helpers import request, start_server

    ckpt, bundle_path = exported
    if "vae" not in str(ckpt):
        pytest.skip("one server start is enough: the VAE bundle with embedded categoricals")
    bundle = Bundle(bundle_path)
    rows = json_rows(make_card_transactions(30, 0.1, seed=6).drop(columns=["is_fraud"]))[:4]
    (want,), _ = serve_batch(TransactionRowsAdapter(bundle.metadata), [{"rows": rows}], bundle.run)
    server = start_server("finance", bundle_path, tmp_path / "server.log", "--max_batch_size", "8")
    try:
        status, info = request(server.url + "/info")
        assert status == 200 and {"rows", "row", "generic"} <= set(info["model"]["request_forms"])
        status, answer = request(server.url + "/predict", {"rows": rows})
        assert status == 200 and len(answer["predictions"]) == 4 and answer["threshold"] == want["threshold"], answer
        for got, ref in zip(answer["predictions"], want["predictions"]):
            assert got["score"] == pytest.approx(ref["score"], rel=1e-5) and got["is_alert"] == ref["is_alert"]
            assert [f["feature"] for f in got["top_features"]] == [f["feature"] for f in ref["top_features"]]
        status, answer = request(server.url + "/predict", {"row": rows[2]})
        assert status == 200 and answer["score"] == pytest.approx(want["predictions"][2]["score"], rel=1e-5), answer
        status, answer = request(server.url + "/predict", {"rows": [rows[0], {**rows[1], "amount": "lots"}]})
        assert status == 422 and answer["detail"].startswith("rows[1].amount: expected a number"), answer
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.output()


# ----- issue 15: no silent wrong results -----------------------------------------------------------
def test_one_extreme_training_value_does_not_silence_its_column():
    """A standard deviation with two 1e30 in it is ~1e28: every other row's feature would be 0. The robust
    scale (winsorised) ignores them; the extreme rows are compressed beyond CLIP_UNITS and the fit says so in notes."""
    from domains.finance.preprocessing import CLIP_UNITS

    frame = make_card_transactions(400, 0.05, seed=1)
    roles = ColumnRoles(**SYNTHETIC_ROLES)
    clean = TablePreprocessor(roles).fit(frame, "train.csv")
    spoiled = frame.copy()
    spoiled.loc[[10, 20], "distance_from_home_km"] = 1e30
    robust = TablePreprocessor(roles).fit(spoiled, "train.csv")
    column = clean.numeric_feature_names.index("distance_from_home_km")
    a, b = clean.transform(frame, "t")["numeric"][:, column], robust.transform(spoiled, "t")["numeric"][:, column]
    others = np.setdiff1d(np.arange(len(frame)), [10, 20])
    assert a[others].std() > 0.5 and np.allclose(a[others], b[others], rtol=0.1, atol=0.05)  # the feature still varies, unchanged
    assert b[10] == b[20] and CLIP_UNITS < b[10] < CLIP_UNITS + 89 and np.isfinite(b).all()  # compressed, still the largest
    assert b[10] == b.max() and any("'distance_from_home_km':" in note and "compressed" in note for note in robust.notes)
    # a state saved before robust scaling (means / stds) loads and scores as it was trained
    legacy = {**clean.state_dict(), "means": clean.centers, "stds": clean.scales}
    for key in ("centers", "scales", "lows", "highs", "clip", "scaling"):
        legacy.pop(key)
    restored = TablePreprocessor.from_state_dict(legacy)
    assert restored.scaling == "standard" and np.array_equal(restored.transform(frame, "t")["numeric"], clean.transform(frame, "t")["numeric"])


def test_diverged_weights_stop_validation_with_the_reason_instead_of_a_crash(tmp_path):
    """lr 1e6 used to end in AttributeError ('tuple' object has no attribute 'double'): CatMetric dropped every NaN
    score, leaving an empty list. NaN scores now stop the run naming the cause (exit 1 through the runner)."""
    import lightning.pytorch as pl

    from domains.finance.model import FraudAutoencoder
    from pipelines.guards import NonFiniteLossError

    dm = TransactionDataModule(synthetic_rows=600, batch_size=128, **SYNTHETIC_ROLES)
    model = FraudAutoencoder(hidden_dims=[8], latent_dim=2, num_numeric=dm.num_numeric, feature_groups=dm.feature_groups,
                             numeric_feature_groups=dm.numeric_feature_groups)  # fmt: skip
    with torch.no_grad():
        next(model.network.parameters()).fill_(float("nan"))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"validation anomaly scores are NaN or inf: the weights diverged"):
        trainer.validate(model, datamodule=dm)
    assert torch.isnan(model.threshold)  # nothing was calibrated on NaN scores
