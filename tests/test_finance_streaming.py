"""Finance ``--data.streaming true``: a CSV/Parquet table read in chunks into a memory-mapped cache
(domains/finance/streaming.py) gives what the in-memory path gives: the same rows per split under
every rule, the same fitted preprocessing and drift reference, the same batches and the same
first-epoch loss; bad input is refused as before; bad options exit 2 before anything is written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported at collection, as in tests/test_bad_inputs_finance.py)
import numpy as np
import pandas as pd
import pytest

from domains.finance.data import SYNTHETIC_ROLES, TransactionDataModule
from domains.finance.synthetic import make_card_transactions
from pipelines.errors import InputError
from tests.bad_inputs import BadInput, check_refused, params
from tests.conftest import only_run, run_pipeline, run_pipeline_process
from tests.test_bad_inputs_finance import CASES, TINY, flat, table

ROWS = 600
RULES = {
    "random-semi-supervised": {},
    "random-unsupervised": {"mode": "unsupervised"},
    "hash": {"split_by": "hash", "split_key": "customer_id"},
    "time": {"split_by": "time", "time_column": "timestamp"},
    "column": {"split_column": "fold"},
    "embedding-few-categories": {"categorical_encoding": "embedding", "max_categories": 3, "min_category_count": 2},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("streaming")
    frame = make_card_transactions(ROWS, fraud_rate=0.05, seed=0)
    frame["fold"] = np.array(["train", "train", "train", "val", "test"])[np.arange(ROWS) % 5]
    frame.loc[[4, 40], "amount"] = np.nan  # imputed with the training median
    frame.to_csv(folder / "t.csv", index=False)
    frame.to_parquet(folder / "t.parquet", index=False, row_group_size=128)
    return folder


def both(path: Path, cache: Path, **options) -> tuple[TransactionDataModule, TransactionDataModule]:
    """The in-memory data module and the streaming one (chunks of 97 rows: not a divisor of anything here)."""
    roles = {**SYNTHETIC_ROLES, "ignore_columns": [] if options.get("split_column") else ["fold"], **options}
    return TransactionDataModule(path=str(path), **roles), TransactionDataModule(path=str(path), streaming=True, cache_dir=str(cache), predict_chunk_rows=97, **roles)


#: every rule on CSV; two on Parquet (its chunks are record batches, the code after them is the same)
CASES_READ = [("t.csv", rule) for rule in RULES] + [("t.parquet", "random-semi-supervised"), ("t.parquet", "time")]


@pytest.mark.parametrize(("name", "rule"), CASES_READ)
def test_streaming_gives_the_same_splits_fitted_state_reference_and_batches(files, tmp_path, name, rule):
    memory, streamed = both(files / name, tmp_path / "cache", **RULES[rule])
    assert (memory.split_assignment == streamed.split_assignment).all()
    assert np.array_equal(memory.labels, streamed.labels)
    assert streamed.fitted.state_dict() == memory.fitted.state_dict()  # medians, robust scales, ranges, vocabularies: exactly
    for split in ("train", "val", "test"):
        a, b = memory._split(split), streamed._split(split)
        assert len(a) == len(b)
        picked = list(np.random.default_rng(1).permutation(len(a))[:50])
        batch_a, batch_b = a.__getitems__(picked), b.__getitems__(picked)
        for key, value in batch_a.items():
            assert value.dtype == batch_b[key].dtype and value.shape == batch_b[key].shape and (value == batch_b[key]).all(), (split, key)
    assert streamed.reference_statistics == memory.reference_statistics
    assert streamed.describe_data() == memory.describe_data()
    assert "table" not in vars(streamed), "the streaming data module never holds the whole table"


@pytest.mark.parametrize("time_is_a_feature", [False, True])
def test_a_time_column_naive_in_one_chunk_and_zoned_in_a_later_one_is_refused_as_in_memory(files, tmp_path, time_is_a_feature):
    """The time split's column read in chunks of 97 rows: rows 1-291 without a time zone, rows 292-600 with one (no chunk mixes
    the two). Each chunk alone is one kind; the whole column is not, and the split's cutoff would move the zoned rows by
    their offset. Refused as the in-memory path refuses it (the same words), with no cache left behind."""
    frame = pd.read_csv(files / "t.csv", keep_default_na=False)
    frame.loc[291:, "timestamp"] = frame.loc[291:, "timestamp"].str.replace(" ", "T") + "+02:00"
    frame.to_csv(tmp_path / "zones.csv", index=False)
    roles = {"split_by": "time", "time_column": "timestamp"}
    if not time_is_a_feature:  # read only by the split: the features' timestamp checks never see it
        roles.update(timestamp_columns=[], ignore_columns=["fold", "timestamp"])
    messages = []
    for module in both(tmp_path / "zones.csv", tmp_path / "cache", **roles):
        with pytest.raises(InputError) as refused:
            module.setup("fit")
        messages.append(flat(str(refused.value)))
    assert messages[1].startswith(messages[0]), messages  # (the streamed one adds that later chunks were not read)
    assert "column 'timestamp' (--data.time_column): row 292 holds a time with a time zone" in messages[1] and "row 1 one without" in messages[1]
    cache = tmp_path / "cache"
    assert not cache.exists() or not list(cache.iterdir())


def test_a_second_data_module_reuses_the_cache_and_a_changed_file_gets_its_own(files, tmp_path):
    cache = tmp_path / "cache"
    first = both(files / "t.csv", cache)[1]
    first.setup("fit")
    folders = sorted(p.name for p in cache.iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    again = both(files / "t.csv", cache)[1]
    again.setup("fit")
    assert sorted(p.name for p in cache.iterdir()) == folders and {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == stamps
    changed = tmp_path / "t.csv"
    pd.read_csv(files / "t.csv").head(500).to_csv(changed, index=False)
    both(changed, cache)[1].setup("fit")
    assert len(list(cache.iterdir())) == len(folders) + 1 and not list(cache.glob(".*partial*"))


@pytest.mark.parametrize("damage", ["overwritten", "cut-short", "scan-file-missing"])
def test_a_damaged_cache_is_named_removed_and_rebuilt_never_read(files, tmp_path, damage, caplog):
    """Trial 4: floats overwritten in the cached features (same size) gave test AUROC 0.52 instead of 0.99 with exit 0."""
    import logging

    cache = tmp_path / "cache"
    first = both(files / "t.csv", cache)[1]
    first.setup("fit")
    numeric = next(cache.rglob("encoded-*/numeric.f32"))
    original = numeric.read_bytes()
    if damage == "overwritten":
        numeric.write_bytes(np.random.default_rng(0).normal(size=numeric.stat().st_size // 4).astype(np.float32).tobytes())
    elif damage == "cut-short":
        with open(numeric, "r+b") as handle:
            handle.truncate(1000)
    else:
        next(cache.glob("*/value-0.f64")).unlink()
    with caplog.at_level(logging.WARNING, logger="domains.finance.streaming"):
        again = both(files / "t.csv", cache)[1]
        again.setup("fit")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "is damaged" in warned and "removed and rebuilt" in warned, warned
    assert ("numeric.f32" if damage != "scan-file-missing" else "value-0.f64") in warned
    assert next(cache.rglob("encoded-*/numeric.f32")).read_bytes() == original, "rebuilt from the file, not read damaged"
    assert not list(cache.rglob(".*damaged*")) and not list(cache.rglob(".*partial*"))


def test_streamed_training_has_the_same_losses_and_a_checkpoint_tests_and_scores(files, tmp_path):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    common = ["--data.path", str(files / "t.csv"), "--data.ignore_columns=[fold]", *TINY, "--trainer.limit_train_batches=4", "--runs_dir", str(runs)]
    split = ["--data.split_by=hash", "--data.split_key=customer_id"]
    run_pipeline("finance", *common, *split, "--run_id", "memory")
    run_pipeline("finance", *common, *split, "--run_id", "streamed", "--data.streaming=true", f"--data.cache_dir={cache}", "--data.predict_chunk_rows=100")

    def metrics(run: str) -> list[dict]:
        return [json.loads(line) for line in (runs / "finance" / run / "metrics.jsonl").read_text().splitlines()]

    memory, streamed = metrics("memory"), metrics("streamed")
    assert [sorted(row) for row in memory] == [sorted(row) for row in streamed]
    for a, b in zip(memory, streamed):
        for key in ("train/loss_epoch", "val/loss", "val/auroc", "test/loss", "test/auroc"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    assert any("train/loss_epoch" in row for row in streamed)

    # test from the streamed run's checkpoint without split options: its hash split is adopted, the same test rows scored
    streamed_options = ["--run_id", "streamed", "--ckpt_path", "best", "--data.streaming=true", f"--data.cache_dir={cache}"]
    run_pipeline("finance", "test", *common, *streamed_options)
    retested = [row for row in metrics("streamed") if row.get("stage") == "test"]
    assert len(retested) == 2 and retested[1]["test/auroc"] == pytest.approx(retested[0]["test/auroc"], rel=1e-6)
    # predict scores a file (the test split is scored by `test`)
    scoring = tmp_path / "score.csv"
    make_card_transactions(150, seed=3).drop(columns=["is_fraud"]).to_csv(scoring, index=False)
    run_pipeline("finance", "predict", *common, *streamed_options, "--data.predict_path", str(scoring))
    assert len(pd.read_csv(runs / "finance" / "streamed" / "predictions.csv")) == 150


OPTIONS = [
    BadInput("cache-dir-without-streaming", (*TINY, "--data.path", "{tmp}/t.csv", "--data.cache_dir", "{tmp}/../cache"),
             ("--data.cache_dir", "--data.streaming true"), table()),  # fmt: skip
    BadInput("streaming-synthetic", (*TINY, "--data.streaming=true"), ("--data.streaming true", "csv or parquet", "synthetic")),
    BadInput("streaming-npz", (*TINY, "--data.streaming=true", "--data.path", "{tmp}/a.npz"), ("--data.streaming true", "a.npz"),
             lambda f: np.savez(f / "a.npz", X=np.zeros((50, 2)), y=np.arange(50) % 2)),  # fmt: skip
    BadInput("cache-dir-is-a-file", (*TINY, "--data.path", "{tmp}/t.csv", "--data.streaming=true", "--data.cache_dir", "{tmp}/t.csv"),
             ("--data.cache_dir", "t.csv", "is a file"), table()),  # fmt: skip
    BadInput("streaming-not-a-boolean", (*TINY, "--data.path", "{tmp}/t.csv", "--data.streaming=sometimes"), ("streaming",), table()),
]


@pytest.mark.parametrize("case", params(OPTIONS))
def test_bad_streaming_options_exit_2_before_anything_is_written(case, tmp_path, capsys):
    message = flat(check_refused("finance", dataclasses.replace(case, expect=()), tmp_path, capsys))
    assert all(expected.lower() in message for expected in case.expect), message
    cache = tmp_path / "cache"
    assert not cache.exists() or not list(cache.iterdir())
    assert not list(cache.glob(".*partial*"))


def test_a_streamed_predict_without_a_file_to_score_is_refused(tiny_run, tmp_path, capsys):
    """``predict --data.streaming true`` scores a file given with ``--data.predict_path``; without one, exit 2 naming it
    (on a trained run: predict without a checkpoint is refused before this, as it would score an untrained model)."""
    from tests.conftest import copy_run

    run = copy_run(tiny_run("finance"), tmp_path / "runs")
    table()(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_pipeline("finance", "predict", "--ckpt_path", "best", "--run_id", run.name, "--runs_dir", str(tmp_path / "runs"), "--data.path",
                     str(tmp_path / "t.csv"), "--data.streaming=true", "--data.cache_dir", str(tmp_path / "cache"))  # fmt: skip
    message = flat(capsys.readouterr().err)
    assert stop.value.code == 2 and "scores a file: give it with --data.predict_path" in message, message
    assert not list(run.glob("predictions*.csv")) and not list((tmp_path / "cache").glob(".*partial*"))


#: the bad-input table's training cases on a CSV/Parquet file whose refusal comes from reading the file
STREAMED = {"inf-in-amount", "inf-in-parquet", "text-in-numeric", "boolean-garbage", "timestamp-garbage", "all-missing-numeric",
            "duplicate-header-csv", "duplicate-header-parquet", "column-without-role", "configured-column-missing", "latin-1-deep-in-file",
            "cut-short", "label-column-missing", "single-class", "label-value-2", "one-fraud-row", "empty-file", "header-only", "missing-file",
            "copied-rows", "transaction-id-fanned-out", "timestamp-zoned-among-naive", "timestamp-zones-differ-between-chunks"}  # fmt: skip


@pytest.mark.parametrize("case", params([c for c in CASES if c.id in STREAMED]))
def test_the_bad_input_table_is_refused_the_same_when_streaming(case, tmp_path, capsys):
    streamed = dataclasses.replace(case, args=(*case.args, "--data.streaming=true", "--data.cache_dir", "{tmp}/../cache", "--data.predict_chunk_rows=64"), expect=())
    message = flat(check_refused("finance", streamed, tmp_path, capsys))
    missing = [expected for expected in case.expect if expected.lower() not in message]
    assert not missing, f"{missing} not in the error message:\n{message}"
    cache = tmp_path / "cache"
    assert not cache.exists() or not list(cache.iterdir()), f"a refused input writes no cache, complete or not: {sorted(p.name for p in cache.iterdir())}"


def test_two_process_ddp_streams_one_cache_and_each_rank_trains_on_its_share(files, tmp_path):
    """Real DDP (gloo, 2 CPU processes): both ranks build or map the same cache (no half-written folder
    left), and DistributedSampler gives each rank half the training batches, as in memory."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    result = run_pipeline_process(
        "finance", "--data.path", str(files / "t.csv"), "--data.ignore_columns=[fold]", "--data.streaming=true", f"--data.cache_dir={cache}",
        "--trainer.max_epochs=1", "--data.batch_size=32", "--model.hidden_dims=[8]", "--model.latent_dim=2",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--runs_dir", str(runs),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1 and not list(cache.rglob(".*partial*"))
    train_rows = int((both(files / "t.csv", cache)[1].split_assignment == "train").sum())
    summary = json.loads((only_run(runs, "finance") / "summary.json").read_text())
    assert summary["global_step"] == -(-train_rows // 2) // 32, "each rank draws batches from its half of the training rows"
