"""Conventions shared by the commands: one option spelling (the other still accepted, with a warning),
``export --config``, W&B's mode passed to ``wandb.init`` (the environment left alone), the CSV pre-read
in one pass (:func:`pipelines.csv_text.check_csv_text`), messages on stderr from rank zero only and
torchmetrics figures drawn without pyplot."""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import sys

import pytest
import torch

from pipelines.errors import InputError
from pipelines.csv_text import check_csv_text
from tests.conftest import run_pipeline


# ----- one spelling: `_` between words; `-` accepted with a warning -----------------------------
@pytest.mark.parametrize("spelling", ["--max_batch_size", "--max-batch-size"])
def test_serve_takes_both_spellings_of_an_option_and_warns_about_the_old_one(spelling, capsys):
    from pipelines.serving_options import build_parser

    args = build_parser("serve").parse_args(["finance", "--bundle", "b", spelling, "8", "--drain-timeout=2.5"])
    assert (args.max_batch_size, args.drain_timeout) == (8, 2.5)
    err = capsys.readouterr().err
    assert "--drain-timeout is deprecated, spell it --drain_timeout" in err
    assert ("--max-batch-size is deprecated, spell it --max_batch_size" in err) == (spelling == "--max-batch-size")
    assert "--max_batch_size" in build_parser("serve").format_help() and "--max-batch-size" not in build_parser("serve").format_help()


@pytest.mark.parametrize("spelling", ["--warm_start", "--warm-start"])
def test_retrain_takes_both_spellings_and_passes_runner_options_on_unchanged(spelling, capsys):
    from pipelines.retrain import parse_args

    options, runner_args = parse_args(["finance", spelling, "--trainer.max_epochs=1", "--data.batch_size", "8"])
    assert options.warm_start is True and runner_args == ["--trainer.max_epochs=1", "--data.batch_size", "8"]
    assert ("--warm-start is deprecated, spell it --warm_start" in capsys.readouterr().err) == (spelling == "--warm-start")


def test_a_misspelt_option_is_still_refused_with_did_you_mean(capsys):
    from pipelines.monitor import main

    with pytest.raises(SystemExit) as stop:
        main(["a.csv", "b.csv", "--psi-treshold", "0.3"])
    assert stop.value.code == 2 and "did you mean '--psi_threshold'" in capsys.readouterr().err


# ----- export reads --config and PIPELINES_EXPORT__* like the runner ---------------------------------
def test_export_takes_its_options_from_a_config_file_and_variables(tiny_run, tmp_path, monkeypatch, capsys):
    run = tiny_run("finance")
    config = tmp_path / "export.yaml"
    config.write_text(f"ckpt_path: best\nrun_id: {run.name}\nruns_dir: {run.parent.parent}\nformat: torchscript\noutput: {tmp_path / 'bundle'}\n")
    monkeypatch.setenv("PIPELINES_EXPORT__MODEL_NAME", "fraud-from-env")
    run_pipeline("finance", "export", "--config", str(config))
    metadata = (tmp_path / "bundle" / "metadata.json").read_text()
    assert (tmp_path / "bundle" / "model.pt").is_file() and "fraud-from-env" in metadata
    with pytest.raises(SystemExit) as stop:  # a misspelt key of the file: exit 2, one paragraph, nothing written
        config.write_text(f"ckpt_pth: best\nrun_id: {run.name}\noutput: {tmp_path / 'other'}\n")
        run_pipeline("finance", "export", "--config", str(config))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "ckpt_path" in err and "Traceback" not in err and not (tmp_path / "other").exists()


# ----- W&B: offline unless configured, told to wandb.init, the environment untouched ------------
def test_wandb_mode_reaches_wandb_init_and_the_environment_is_left_alone(tmp_path, monkeypatch):
    from pipelines.run_folder import RunFolder
    from pipelines.tracking import finish_wandb_run, make_wandb_logger, wandb_mode

    assert wandb_mode({}) == "offline" and wandb_mode({"WANDB_API_KEY": "k"}) == "online" and wandb_mode({"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}) == "disabled"
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = make_wandb_logger(RunFolder("finance", "mode-1", tmp_path / "finance" / "mode-1", None))
    try:
        assert logger.experiment.settings.mode == "offline" and logger.experiment.offline
    finally:
        finish_wandb_run()
    assert "WANDB_MODE" not in os.environ
    assert list((tmp_path / "finance" / "mode-1" / "wandb").glob("offline-run-*")), "an offline run folder"


# ----- the CSV pre-read: one pass, the same refusals as the two checks it replaced ------------------
def reference_short_row(text: str, delimiter: str) -> tuple[int, int, int] | None:
    """What the former ``check_field_counts`` found (the ``csv`` module over the whole text), the header
    being the first line that is not blank: (line, data row, number of values) of the first short row."""
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""), delimiter=delimiter)
    filled = [(fields, reader.line_num) for fields in reader if fields]
    widths = [(line, row, len(fields)) for row, (fields, line) in enumerate(filled)]
    return next(((line, row, width) for line, row, width in widths[1:] if width != widths[0][2]), None)


def random_table(rng: random.Random, delimiter: str) -> str:
    cells = ["1", "2.5", "café", "x", "", "naïve ü", '"a, b"', '"two\nlines"', '"say ""hi"""']
    newline = rng.choice(["\n", "\r\n"])
    lines = ["\ufeffa" if rng.random() < 0.3 else "a", "b", "c"]
    text = delimiter.join(lines) + newline
    for _ in range(rng.randint(5, 60)):
        width = 3 if rng.random() > 0.03 else rng.choice([2, 4])
        quoted = rng.random() < 0.1
        row = [rng.choice(cells if quoted else cells[:6]) for _ in range(width)]
        text += (newline if rng.random() < 0.05 else "") + delimiter.join(row) + newline
    return text if rng.random() < 0.7 else text.rstrip("\r\n")


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_csv_text_check_finds_what_the_csv_module_finds_across_block_boundaries(tmp_path, delimiter):
    """Random tables (UTF-8 across block edges, CRLF, BOM, quoted delimiters and line breaks, blank lines,
    short and long rows) read in blocks of 1 to 64 bytes: the row refused is the one the csv module finds."""
    rng = random.Random(7)
    path = tmp_path / "t.csv"
    for case in range(150):
        text = random_table(rng, delimiter)
        path.write_text(text, encoding="utf-8", newline="")
        expected = reference_short_row(text, delimiter)
        for block_size in (1, 2, 3, 7, 64):
            if expected is None:
                assert check_csv_text(path, delimiter, block_size=block_size) == ["a", "b", "c"], (case, block_size, text)
            else:
                with pytest.raises(InputError) as refused:
                    check_csv_text(path, delimiter, block_size=block_size)
                line, row, count = expected
                assert f"line {line} (data row {row}) has {count} values but the header has 3 columns" in str(refused.value), (case, block_size, text)


def test_csv_text_check_reports_a_latin1_byte_before_a_short_row_and_a_foreign_delimiter_before_both(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"amount,merchant\n1,cafe\n2\n" + b"3,caf\xe9\n" * 3)  # a short row at line 3, Latin-1 at line 4
    with pytest.raises(InputError, match=r"line 4 \(data row 3\), column 'merchant', byte offset 30 \(0xe9\) is not UTF-8"):
        check_csv_text(path, block_size=8)
    path.write_text("amount;merchant\n1,5;cafe\n2;bakery\n")  # decimal commas: rows of 2 and 1 values
    with pytest.raises(InputError, match="the file looks ';'-separated"):
        check_csv_text(path)
    path.write_bytes(b"")
    assert check_csv_text(path) == []


# ----- messages: stderr, labelled, rank zero only ------------------------------------------------------
def test_messages_are_labelled_and_come_from_rank_zero_only(capsys, monkeypatch):
    from lightning_utilities.core.rank_zero import rank_zero_only

    from pipelines.messages import show_messages

    show_messages()
    logging.getLogger("pipelines.cli").info("run folder runs/x")
    logging.getLogger("domains.healthcare.data").warning("binary task")
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    logging.getLogger("pipelines.cli").info("said by rank one")
    assert capsys.readouterr().err == "[pipelines] run folder runs/x\n[healthcare] warning: binary task\n"


# ----- figures: a torchmetrics plot on a figure of ours, pyplot never asked ------------------------------
def test_a_multilabel_torchmetrics_plot_is_drawn_without_pyplot(tmp_path):
    from torchmetrics.classification import MultilabelConfusionMatrix, MultilabelROC

    from pipelines.plots import metric_figure, save_figure_atomic

    labels = ["effusion", "nodule", "mass", "edema", "fibrosis"]
    probabilities, target = torch.rand(64, 5, generator=torch.Generator().manual_seed(0)), torch.randint(0, 2, (64, 5), generator=torch.Generator().manual_seed(1))
    confusion, roc = MultilabelConfusionMatrix(num_labels=5), MultilabelROC(num_labels=5)
    confusion.update(probabilities, target)
    roc.update(probabilities, target)
    figures = {"confusion": metric_figure(confusion, confusion.compute(), panels=labels),
               "roc": metric_figure(roc, roc.compute(), score=True, labels=labels)}  # fmt: skip
    assert len([a for a in figures["confusion"].axes if a.get_title()]) == 5 and figures["confusion"].axes[0].get_title() == "Label effusion"
    for name, figure in figures.items():
        save_figure_atomic(figure, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 5000
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == [], "no figure left open in pyplot"
