"""Finance export and serving: a real exported bundle scores rows exactly as its checkpoint does; the
``rows`` form is validated row by row and column by column, also over a real HTTP server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from domains.finance.preprocessing import UNKNOWN, TablePreprocessor
from domains.finance.synthetic import make_card_transactions
from tests.conftest import only_run, run_pipeline
from tests.test_finance import TINY, write_transactions

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
    # a category the training never kept is named per row (trial finding: scored as <unknown> without a word)
    assert [(i, p["unseen_categories"]) for i, p in enumerate(answer["predictions"]) if p["unseen_categories"]] == [(3, ["merchant_category"])]
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
        # a JSON integer beyond float64 (valid JSON; pandas cannot convert it): refused like 1e300, not a 500 for the batch
        ({"rows": edited(1, amount=10**309)}, "rows[1].amount: expected a finite number within float32's range"),
        ({"rows": edited(2, distance_from_home_km=-(10**309))}, "rows[2].distance_from_home_km: expected a finite number within float32's range"),
        ({"rows": edited(0, card_present=10**309)}, "rows[0].card_present: expected a boolean"),
        ({"rows": edited(0, amount=True)}, "rows[0].amount: expected a number"),
        ({"rows": edited(2, card_present="sometimes")}, "rows[2].card_present: expected a boolean"),
        ({"rows": edited(1, timestamp="yesterday-ish")}, "rows[1].timestamp: expected a timestamp"),
        # trained on timestamps without a zone: a zoned one would shift the hour features in silence
        ({"rows": edited(1, timestamp="2024-03-05T10:00:00+02:00")}, "rows[1].timestamp: expected a timestamp without a time zone, as the model was trained on"),
        ({"row": {**good[0], "timestamp": "2024-03-05T10:00:00Z"}}, "row.timestamp: expected a timestamp without a time zone"),
        ({"rows": edited(0, channel=["online"])}, "rows[0].channel: expected a single value"),
        ({"rows": edited(1, nation="FR")}, "rows[1].nation: unknown column"),
        # the optional label and ids were taken whatever they held (a label "x", an id sent as an object)
        ({"rows": edited(1, is_fraud="x")}, "rows[1].is_fraud: expected a label of the training classes ['0', '1']"),
        ({"row": {**good[0], "transaction_id": {"a": 1}}}, "row.transaction_id: expected a single value"),
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

    # ids and the label may be sent; null is a missing value (imputed as in training); timestamps in other ISO 8601 layouts parse
    mixed = edited(0, is_fraud=1, amount=None, timestamp="2024-03-05T10:00:00")
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
        # finite float32 features the model's arithmetic overflows: refused, never a null score read as "not an alert"
        zeros = {name: [0] * spec["shape"][-1] for name, spec in bundle.inputs.items()}  # numeric, and categorical codes
        status, answer = request(server.url + "/predict", {"inputs": {**zeros, "numeric": [1e20] + zeros["numeric"][1:]}})
        assert status == 422 and answer["detail"].startswith("inputs.") and "overflowed the model" in answer["detail"], answer
        status, answer = request(server.url + "/predict", {"inputs": zeros})
        assert status == 200 and answer["outputs"]["score"] is not None, answer
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.output()


def test_the_server_batch_answers_each_request_alone_when_one_fails(exported, monkeypatch):
    """The server's own batch path (``BundleAPI`` decode / predict / encode, in this process): a request
    whose values cannot be prepared is refused by itself, and the requests batched with it get the
    answers they get alone; a failure inside inference is confined to the request that caused it."""
    import signal

    from pipelines.serving_api import BundleAPI, Decoded

    api = BundleAPI(exported[1], max_batch_size=8)
    handler = signal.getsignal(signal.SIGINT)
    try:
        api.setup("cpu")
    finally:
        signal.signal(signal.SIGINT, handler)  # setup ignores Ctrl+C in its (worker) process
    good = json_rows(make_card_transactions(30, 0.1, seed=8).drop(columns=["is_fraud"]))[:4]

    def answers(requests: list[dict]) -> list[tuple[int, dict]]:
        responses = [api.encode_response(r) for r in api.predict([api.decode_request(q) for q in requests])]
        return [(r.status_code, json.loads(r.body)) for r in responses]

    alone = answers([{"rows": good[:2]}]) + answers([{"row": good[3]}])
    huge = {"rows": [good[2], {**good[2], "amount": 10**309}]}
    batched = answers([{"rows": good[:2]}, huge, {"row": good[3]}])
    assert [code for code, _ in batched] == [200, 422, 200], batched
    assert batched[1][1]["detail"].startswith("rows[1].amount: expected a finite number within float32's range"), batched[1]
    assert batched[0] == alone[0] and batched[2] == alone[1]

    # a fault inside the model call (any exception, not only a refusal) fails only the request whose rows carry it
    items = [api.decode_request({"rows": good[:2]}), api.decode_request({"rows": good[2:3]})]
    assert all(isinstance(item, Decoded) for item in items)
    run, adapter = api.slot.current.bundle.run, items[1].adapter
    target = adapter.preprocessor.transform(adapter.features(good[2:3]), "the third row")["numeric"][0]

    def failing_on_the_third_row(**inputs):
        if np.all(inputs["numeric"] == target, axis=1).any():
            raise RuntimeError("a fault in the model call")
        return run(**inputs)

    monkeypatch.setattr(api.slot.current.bundle, "run", failing_on_the_third_row)
    codes = [api.encode_response(r).status_code for r in api.predict(items)]
    assert codes == [200, 500], codes
