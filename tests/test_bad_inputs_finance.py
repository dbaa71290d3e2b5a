"""Finance: every bad input a user may give is refused (exit 2) with one paragraph naming the file,
row, column or option, before anything is written (tests/bad_inputs.py).

Training inputs go through the table-driven harness. Scoring files need a trained run: a copy of
the domain's tiny run (tests/conftest.py), then each bad scoring file must leave that run folder
byte for byte as it was (no predictions file added, no config or provenance rewritten). Cases the harness does not fit (a
scoring file, an extreme but finite value) are plain tests below it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported at collection: its log handler must not bind to one test's captured stderr)
import numpy as np
import pandas as pd
import pytest

from domains.finance.synthetic import make_card_transactions
from tests.bad_inputs import BadInput, check_refused, folder_digests, params
from tests.conftest import copy_run, run_pipeline

TINY = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--data.batch_size=64", "--model.hidden_dims=[8]", "--model.latent_dim=2")
TRAIN = ("--data.path", "{tmp}/t.csv", *TINY)


def table(edit: Callable[[pd.DataFrame], pd.DataFrame | None] | None = None, name: str = "t.csv", rows: int = 300) -> Callable[[Path], None]:
    """A ``make`` that writes the synthetic transactions (as text cells), edited, to ``name`` (CSV or Parquet)."""

    def make(folder: Path) -> None:
        frame = make_card_transactions(rows, fraud_rate=0.05, seed=0)
        if name.endswith(".csv"):
            frame = frame.astype(str)
        if edit is not None:
            edited = edit(frame)
            frame = frame if edited is None else edited
        path = folder / name
        frame.to_csv(path, index=False) if name.endswith(".csv") else frame.to_parquet(path, index=False)

    return make


def cell(column: str, row: int, value: object) -> Callable[[pd.DataFrame], None]:
    """Set one cell; ``row`` is the 1-based data row the error must name."""

    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame[column] = frame[column].astype(object)
        frame.loc[row - 1, column] = value
        return frame

    return edit


def assign(**columns: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda frame: frame.assign(**columns)


def text(content: str, name: str = "t.csv") -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(content)


def npz(**arrays: object) -> Callable[[Path], None]:
    return lambda folder: np.savez(folder / "a.npz", **arrays)


def adbench(edit: Callable[[np.ndarray, np.ndarray], None]) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(200, 4)), (np.arange(200) < 20).astype(np.int64)
        edit(x, y)
        np.savez(folder / "a.npz", X=x, y=y)

    return make


def duplicate_amount(frame: pd.DataFrame) -> pd.DataFrame:
    frame.columns = [c if c != "channel" else "amount" for c in frame.columns]
    return frame


def cut_short(folder: Path) -> None:
    """The table with its last line cut after 5 values (a truncated copy): pandas would read the rest as missing."""
    table()(folder)
    lines = (folder / "t.csv").read_text().rstrip("\n").split("\n")
    (folder / "t.csv").write_text("\n".join([*lines[:-1], ",".join(lines[-1].split(",")[:5])]))


def latin1(row: int) -> Callable[[Path], None]:
    """The table saved as Latin-1 with a merchant category 'café' at data row ``row`` (its byte 0xe9 is not UTF-8)."""

    def make(folder: Path) -> None:
        frame = make_card_transactions(300, fraud_rate=0.05, seed=0).astype(str)
        frame.loc[row - 1, "merchant_category"] = "café"
        (folder / "t.csv").write_bytes(frame.to_csv(index=False).encode("latin-1"))

    return make


def duplicate_parquet(folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = make_card_transactions(300, fraud_rate=0.05, seed=0)
    columns = [pa.array(frame[c]) for c in frame.columns]
    names = [c if c != "channel" else "amount" for c in frame.columns]
    pq.write_table(pa.table(columns, names=names), folder / "t.parquet")


NPZ = ("--data.path", "{tmp}/a.npz", *TINY)
def copied_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows 3 and 5 exported again at the end (rows 301 and 302)."""
    return pd.concat([frame, frame.iloc[[2, 4]]], ignore_index=True)


def fanned_out(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows 10-12 carry row 4's transaction id with their own customers (a join that fanned out)."""
    frame.loc[9:11, "transaction_id"] = frame.loc[3, "transaction_id"]
    return frame


def zoned_from(row: int) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """Timestamps with a time zone (``+02:00``) from data row ``row`` on, without one before it."""
    return lambda frame: frame.assign(timestamp=[t + "+02:00" if i >= row - 1 else t for i, t in enumerate(frame["timestamp"])])


CASES = [
    # rows: a transaction on several rows lands in train and in test (trial finding: trained in silence)
    BadInput("copied-rows", TRAIN, ("row identifier 'transaction_id'", "rows 3, 301", "exported twice"), table(copied_rows)),
    BadInput("transaction-id-fanned-out", TRAIN, ("row identifier 'transaction_id'", "rows 4, 10, 11, 12", "fanned out"), table(fanned_out)),
    BadInput("label-classes-read-as-booleans", (*TRAIN, "--data.label_classes=[no,yes]"), ("--data.label_classes [false, true]", "YAML reads unquoted", '["no","yes"]'), table()),
    # values
    BadInput("inf-in-amount", TRAIN, ("t.csv", "'amount'", "inf", "row 7", "finite"), table(cell("amount", 7, "inf"))),
    BadInput("minus-inf", TRAIN, ("'distance_from_home_km'", "inf", "row 3"), table(cell("distance_from_home_km", 3, "-inf"))),
    BadInput("1e300", TRAIN, ("'customer_age'", "float32", "row 12"), table(cell("customer_age", 12, "1e300"))),
    BadInput("1e400-overflows-to-inf", TRAIN, ("'amount'", "inf", "row 2"), table(cell("amount", 2, "1e400"))),
    BadInput("inf-in-parquet", ("--data.path", "{tmp}/t.parquet", *TINY), ("t.parquet", "'customer_age'", "inf", "row 5"),
             table(cell("customer_age", 5, np.inf), name="t.parquet")),  # fmt: skip
    BadInput("text-in-numeric", TRAIN, ("'amount'", "non-numeric", "row(s) 5", "'12,50'"), table(cell("amount", 5, "12,50"))),
    BadInput("all-missing-numeric", TRAIN, ("'customer_age'", "empty"), table(assign(customer_age=""))),
    BadInput("boolean-garbage", TRAIN, ("'card_present'", "boolean", "row(s) 4"), table(cell("card_present", 4, "sometimes"))),
    # every day <= 12: a guessing parser read these month-first and trained with wrong weekdays, exit 0
    BadInput("timestamp-day-first", TRAIN, ("'timestamp'", "ISO 8601", "row(s) 1", "ambiguous"),
             table(lambda f: f.assign(timestamp=[f"{1 + i % 12:02d}/01/2024 10:00" for i in range(len(f))]))),
    BadInput("timestamp-garbage", TRAIN, ("'timestamp'", "timestamps", "row(s) 9"), table(cell("timestamp", 9, "yesterday-ish"))),
    # a zoned value is converted to UTC, a naive one taken as UTC as written: the hour features of one kind shifted, exit 0
    BadInput("timestamp-zoned-among-naive", TRAIN, ("t.csv", "'timestamp'", "mixes timestamps without a time zone (data row 1", "with a time zone",
                                                    "(data row 40: '20", "+02:00')", "every value of the column with a zone or every value without"),
             table(lambda f: cell("timestamp", 40, f.loc[39, "timestamp"] + "+02:00")(f))),  # fmt: skip
    # (streamed in chunks of 64 rows: the last chunk, rows 257-300, holds only zoned values; refused across chunks)
    BadInput("timestamp-zones-differ-between-chunks", TRAIN, ("t.csv", "'timestamp'", "without a time zone (data row 1", "(data row 257:", "with a time zone"),
             table(zoned_from(257))),  # fmt: skip
    # columns
    BadInput("duplicate-header-csv", TRAIN, ("t.csv", "'amount' 2 times", "unique"), table(duplicate_amount)),
    BadInput("duplicate-header-parquet", ("--data.path", "{tmp}/t.parquet", *TINY), ("t.parquet", "'amount' 2 times"), duplicate_parquet),
    BadInput("column-without-role", TRAIN, ("'note'", "no role", "--data.ignore_columns"), table(assign(note="x"))),
    BadInput("ignored-column-absent", (*TRAIN, "--data.ignore_columns=[memo]"), ("--data.ignore_columns", "'memo'"), table()),
    BadInput("configured-column-missing", TRAIN, ("'country'", "categorical_columns", "missing"), table(lambda f: f.drop(columns=["country"]))),
    BadInput("column-in-two-roles", (*TRAIN, "--data.numeric_columns=[amount]"), ("'amount'", "both"), table()),
    BadInput("latin-1-deep-in-file", TRAIN, ("t.csv", "line 251 (data row 250)", "'merchant_category'", "0xe9", "not utf-8", "expected a utf-8 file"), latin1(250)),
    BadInput("utf-16-excel-unicode-text", TRAIN, ("t.csv", "utf-16 text", "byte-order mark ff fe", "iconv -f utf-16 -t utf-8"),
             lambda f: (f / "t.csv").write_bytes(make_card_transactions(300, fraud_rate=0.05, seed=0).to_csv(index=False).encode("utf-16"))),
    BadInput("cut-short", TRAIN, ("t.csv", "line 301 (data row 300)", "has 5 values", "cut short"), cut_short),
    BadInput("latin-1-first-row", TRAIN, ("t.csv", "line 2 (data row 1)", "'merchant_category'", "'é'"), latin1(1)),
    BadInput("semicolon-separated", TRAIN, ("t.csv", "looks ';'-separated", "expected ','-separated"), lambda f: make_card_transactions(300, fraud_rate=0.05, seed=0).to_csv(f / "t.csv", index=False, sep=";")),
    BadInput("tab-separated-as-csv", TRAIN, ("t.csv", "looks '\\t'-separated"), lambda f: make_card_transactions(300, fraud_rate=0.05, seed=0).to_csv(f / "t.csv", index=False, sep="\t")),
    BadInput("ragged-csv-line", TRAIN, ("t.csv", "line 3 (data row 2)", "has 3 values but the header has 2 columns"), text("amount,channel\n1,pos\n2,pos,extra\n")),
    # labels
    BadInput("label-column-missing", TRAIN, ("--data.label_column 'is_fraud' is missing", "unsupervised"), table(lambda f: f.drop(columns=["is_fraud"]))),
    BadInput("all-fraud", TRAIN, ("only the fraud class", "no row is labelled normal", "--data.label_classes"), table(assign(is_fraud="1"))),
    BadInput("single-class", TRAIN, ("only the normal class", "auroc", "--data.mode unsupervised"), table(assign(is_fraud="0"))),
    BadInput("label-value-2", TRAIN, ("'is_fraud'", "'2'", "--data.label_classes", "row(s) 30"), table(cell("is_fraud", 30, "2"))),
    BadInput("label-missing-value", TRAIN, ("'is_fraud'", "'<missing>'", "row(s) 8"), table(cell("is_fraud", 8, ""))),
    BadInput("label-typo", (*TRAIN, "--data.label_classes=[legit,fraud]"), ("'Fraud'", "did you mean 'fraud'", "row(s) 11"),
             table(lambda f: cell("is_fraud", 11, "Fraud")(f.assign(is_fraud=f.is_fraud.map({"0": "legit", "1": "fraud"}))))),  # fmt: skip
    BadInput("one-fraud-row", TRAIN, ("val split gets no fraud row", "1 fraud rows"), table(lambda f: f.assign(is_fraud=["1"] + ["0"] * (len(f) - 1)))),
    # files
    BadInput("empty-file", TRAIN, ("t.csv", "is empty"), text("")),
    BadInput("header-only", TRAIN, ("t.csv", "no rows"), table(lambda f: f.head(0))),
    BadInput("missing-file", ("--data.path", "{tmp}/nope.csv", *TINY), ("--data.path", "nope.csv", "not found")),
    BadInput("folder-as-file", ("--data.path", "{tmp}", *TINY), ("--data.path", "not found", "folder")),
    BadInput("wrong-suffix", ("--data.path", "{tmp}/t.txt", *TINY), ("t.txt", ".csv or .parquet"), text("a,b\n1,2\n", "t.txt")),
    # ADBench .npz
    BadInput("npz-wrong-keys", NPZ, ("a.npz", "'X'", "'y'", "found ['features', 'labels']"), npz(features=np.zeros((5, 2)), labels=np.zeros(5))),
    BadInput("npz-nan", NPZ, ("a.npz", "'x2'", "nan", "row 5"), adbench(lambda x, y: x.__setitem__((4, 2), np.nan))),
    BadInput("npz-inf", NPZ, ("a.npz", "'x0'", "inf", "row 1"), adbench(lambda x, y: x.__setitem__((0, 0), -np.inf))),
    BadInput("npz-label-2", NPZ, ("a.npz", "y must hold 0", "row 7"), adbench(lambda x, y: y.__setitem__(6, 2))),
    BadInput("npz-not-an-archive", NPZ, ("a.npz", "cannot read as .npz"), text("not a zip", "a.npz")),
    BadInput("npz-all-anomalies", NPZ, ("only the fraud class",), adbench(lambda x, y: y.__setitem__(slice(None), 1))),
    # options
    BadInput("lr-zero", (*TRAIN, "--model.lr=0"), ("--model.lr 0", "0 < lr <= 1"), table()),
    BadInput("lr-negative", (*TRAIN, "--model.lr=-0.01"), ("--model.lr -0.01",), table()),
    BadInput("lr-1e6", (*TRAIN, "--model.lr=1e6"), ("--model.lr 1000000.0", "0 < lr <= 1"), table()),
    BadInput("lr-nan", (*TRAIN, "--model.lr=nan"), ("model.lr", "nan"), table()),
    BadInput("alert-rate-zero", (*TRAIN, "--model.target_alert_rate=0"), ("--model.target_alert_rate",), table()),
    BadInput("fractions", (*TRAIN, "--data.val_fraction=0.6", "--data.test_fraction=0.5"), ("--data.val_fraction", "sum below 1"), table()),
]


def flat(text: str) -> str:
    """The paragraph as one line, lower case: its wrapping may fall inside an expected phrase."""
    return " ".join(text.split()).lower()


@pytest.mark.parametrize("case", params(CASES))
def test_bad_training_input_is_refused(case, tmp_path, capsys):
    message = flat(check_refused("finance", dataclasses.replace(case, expect=()), tmp_path, capsys))
    missing = [expected for expected in case.expect if expected.lower() not in message]
    assert not missing, f"{missing} not in the error message:\n{message}"


# ----- scoring files: a trained run's folder must stay byte for byte as it was ------------------------
@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A copy of the domain's tiny run (tests/conftest.py; synthetic transactions, the columns of the
    scoring files): (its folder, a folder for scoring files, the predict arguments)."""
    folder = tmp_path_factory.mktemp("finance-scoring")
    runs = folder / "runs"
    run = copy_run(tiny_run("finance"), runs)
    predict = ["finance", "predict", "--runs_dir", str(runs), "--run_id", run.name, "--ckpt_path", "best", "--data.predict_chunk_rows=100"]
    return run, folder, predict


def scoring_file(folder: Path, name: str, rows: int = 1000, edit: Callable[[pd.DataFrame], object] | None = None) -> Path:
    frame = make_card_transactions(rows, fraud_rate=0.05, seed=7).drop(columns=["is_fraud"]).astype(str)
    if edit is not None:
        edit(frame)
    path = folder / name
    frame.to_csv(path, index=False) if name.endswith(".csv") else frame.to_parquet(path, index=False)
    return path


def refuse_scoring(trained, path: Path, expect: tuple[str, ...], capsys) -> None:
    from pipelines.run import main

    run, _, predict = trained
    before = folder_digests(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*predict, "--data.predict_path", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    assert "Traceback" not in err and "error:" in err, err[-3000:]
    message = flat(err[err.index("error:") :])
    for expected in expect:
        assert expected.lower() in message, f"{expected!r} not in {message}"
    assert folder_digests(run) == before, "a refused scoring file changed the run folder"


def setter(column: str, row: int, value: str) -> Callable[[pd.DataFrame], None]:
    return lambda frame: frame.__setitem__(column, [value if i == row - 1 else v for i, v in enumerate(frame[column])])


@pytest.mark.parametrize(
    ("name", "edit", "expect"),
    [
        ("late-1e300.csv", setter("amount", 951, "1e300"), ("late-1e300.csv", "'amount'", "float32", "row 951")),
        ("late-inf.parquet", setter("customer_age", 977, "inf"), ("late-inf.parquet", "'customer_age'", "inf", "row 977")),
        ("late-text.csv", setter("distance_from_home_km", 1000, "far"), ("'distance_from_home_km'", "non-numeric", "row(s) 1000")),
        ("late-boolean.csv", setter("card_present", 812, "maybe"), ("'card_present'", "boolean", "row(s) 812")),
        ("extra-column.csv", lambda f: f.__setitem__("note", "x"), ("--data.predict_path", "unexpected ['note']")),
        ("duplicate.csv", lambda f: f.rename(columns={"channel": "amount"}, inplace=True), ("duplicate.csv", "'amount' 2 times")),
        # trained on timestamps without a zone: zoned ones (from row 501, a later chunk) would shift the hour features
        ("late-zoned.csv", lambda f: f.__setitem__("timestamp", zoned_from(501)(f)["timestamp"]),
         ("late-zoned.csv", "'timestamp'", "with a time zone", "data row 501", "trained on timestamps without a time zone")),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_bad_scoring_file_is_refused_and_the_run_folder_is_untouched(trained, name, edit, expect, capsys):
    run, folder, predict = trained
    refuse_scoring(trained, scoring_file(folder, name, edit=edit), expect, capsys)  # no file added, none changed


def test_scoring_refusals_keep_earlier_predictions_and_empty_files_are_refused(trained, capsys):
    run, folder, predict = trained
    # no W&B run: its background writer may still be flushing into the run folder when the next command starts
    run_pipeline(*predict, "--data.predict_path", str(scoring_file(folder, "good.csv", rows=150)), "--trainer.logger=false")
    assert (run / "predictions.csv").is_file()
    (folder / "empty.csv").write_text("")
    refuse_scoring(trained, folder / "empty.csv", ("empty.csv", "is empty"), capsys)
    scoring_file(folder, "header.csv", rows=20, edit=lambda f: f.drop(f.index, inplace=True))
    refuse_scoring(trained, folder / "header.csv", ("header.csv", "no rows"), capsys)
    label_typo = scoring_file(folder, "typo.csv", rows=300, edit=lambda f: f.__setitem__("is_fraud", ["0"] * 250 + ["fraud"] + ["1"] * 49))
    refuse_scoring(trained, label_typo, ("'is_fraud'", "'fraud'", "row(s) 251"), capsys)
    assert sorted(p.name for p in run.glob("*predictions*")) == ["predictions.csv"]


def test_extreme_finite_and_missing_values_are_scored_never_nan_and_always_alerted(trained):
    """1e30 fits in float32 (not refused): it is clipped, scored finite, named in out_of_range and alerted.
    A missing value is imputed (a finite score, not an alert by itself)."""
    run, folder, predict = trained

    def edit(frame: pd.DataFrame) -> None:
        setter("distance_from_home_km", 3, "1e30")(frame)
        setter("amount", 5, "-1e30")(frame)
        setter("customer_age", 7, "")(frame)

    run_pipeline(*predict, "--data.predict_path", str(scoring_file(folder, "extreme.csv", rows=40, edit=edit)), "--output", "extreme.csv")
    out = pd.read_csv(run / "extreme.csv", keep_default_na=False)
    assert np.isfinite(out["score"]).all() and len(out) == 40
    assert out.loc[2, "out_of_range"] == "distance_from_home_km" and bool(out.loc[2, "is_alert"])
    assert "amount" in out.loc[4, "out_of_range"] and bool(out.loc[4, "is_alert"])
    assert out.loc[6, "customer_age"] == "" and "customer_age" not in out.loc[6, "out_of_range"]
    threshold = float(__import__("torch").load(run / "checkpoints/best.ckpt", weights_only=True)["state_dict"]["threshold"])
    in_range = out["out_of_range"] == ""
    assert (out.loc[in_range, "is_alert"] == (out.loc[in_range, "score"] >= threshold)).all()


def test_serving_answers_rows_as_predict_does_out_of_range_alerted_and_1e300_refused(trained, tmp_path):
    """The same rows through ``predict`` and the served bundle: same out_of_range columns and alerts
    (a 1e30 amount is alerted by both), and 1e300 is refused by both, naming the row and column."""
    from fastapi import HTTPException

    from pipelines.bundle_runtime import Bundle
    from pipelines.export import export_checkpoint
    from pipelines.domain_registry import get_domain
    from pipelines.serving_requests import load_adapters

    run, folder, predict = trained

    def edit(frame: pd.DataFrame) -> None:
        setter("amount", 2, "1e30")(frame)
        setter("distance_from_home_km", 4, "-5e20")(frame)

    path = scoring_file(folder, "serve-same.csv", rows=12, edit=edit)
    run_pipeline(*predict, "--data.predict_path", str(path), "--output", "serve-same.csv", "--trainer.logger=false")
    written = pd.read_csv(run / "serve-same.csv", keep_default_na=False)
    bundle = export_checkpoint(get_domain("finance"), run / "checkpoints" / "best.ckpt", "onnx", tmp_path / "bundle")
    loaded = Bundle(bundle)
    adapter = load_adapters(loaded.metadata)[0]
    rows = [{k: (None if v == "" else v) for k, v in row.items()} for row in pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")]
    for row in rows:
        row["amount"] = float(row["amount"])
        row["distance_from_home_km"] = float(row["distance_from_home_km"])
    answer = adapter.encode(adapter.infer(adapter.decode({"rows": rows}), loaded.run))["predictions"]
    assert [a["out_of_range"] for a in answer] == [c.split(";") if c else [] for c in written["out_of_range"]]
    assert answer[1]["out_of_range"] == ["amount"] and answer[1]["is_alert"] is True
    assert answer[3]["out_of_range"] == ["distance_from_home_km"] and answer[3]["is_alert"] is True
    assert [a["is_alert"] for a in answer] == [str(v).lower() == "true" for v in written["is_alert"]]
    np.testing.assert_allclose([a["score"] for a in answer], written["score"], rtol=1e-4)
    rows[5]["amount"] = 1e300
    with pytest.raises(HTTPException) as refused:  # values are parsed for the whole server batch (infer), refused per request (encode)
        adapter.encode(adapter.infer(adapter.decode({"rows": rows}), loaded.run))
    assert refused.value.status_code == 422 and "rows[5]" in refused.value.detail and "float32" in refused.value.detail, refused.value.detail


def test_a_constant_feature_column_is_reported_not_silently_kept():
    """A numeric column with one value in every training row carries nothing: the fit says so (the
    runner prints the preprocessing's notes), naming the column and the value."""
    from domains.finance.preprocessing import ColumnRoles, TablePreprocessor

    frame = pd.DataFrame({"age": ["42"] * 50, "amount": [str(v) for v in np.random.default_rng(0).lognormal(3, 1, 50)]})
    fitted = TablePreprocessor(ColumnRoles(numeric_columns=["age"], amount_columns=["amount"])).fit(frame, "t.csv")
    assert len(fitted.notes) == 1 and "column 'age' has one value ('42')" in fitted.notes[0] and "--data.ignore_columns" in fitted.notes[0], fitted.notes


def test_the_training_timestamp_kind_is_in_the_checkpoint_and_older_checkpoints_load(trained):
    """Whether the training timestamps carry a time zone is fitted state, saved in the checkpoint; a data module restored
    from it refuses rows of the other kind (``test`` on another file), and a state saved before it existed loads and
    scores either kind, as before."""
    import torch

    from domains.finance.data import TransactionDataModule
    from pipelines.errors import InputError

    run, _, _ = trained
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["TransactionDataModule"]
    assert state["preprocessor"]["timestamp_zones"] == {"timestamp": "naive"}
    rows = make_card_transactions(40, fraud_rate=0.1, seed=5).astype(str)
    zoned = zoned_from(1)(rows)
    restored = TransactionDataModule()
    restored.load_state_dict(state)
    assert restored.fitted.transform(rows, "naive.csv")["numeric"].shape[0] == 40
    with pytest.raises(InputError, match=r"zoned.csv: column 'timestamp' holds timestamps with a time zone .*data row 1: .*trained on timestamps without"):
        restored.fitted.transform(zoned, "zoned.csv")
    older = {**state, "preprocessor": {k: v for k, v in state["preprocessor"].items() if k != "timestamp_zones"}}
    legacy = TransactionDataModule()
    legacy.load_state_dict(older)
    assert legacy.fitted.timestamp_zones == {}
    assert np.array_equal(legacy.fitted.transform(rows, "naive.csv")["numeric"], restored.fitted.transform(rows, "naive.csv")["numeric"])
    assert legacy.fitted.transform(zoned, "zoned.csv")["numeric"].shape[0] == 40

