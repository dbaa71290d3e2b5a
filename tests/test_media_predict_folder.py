"""Media ``predict`` never replaces images an earlier predictions file names: each predict writes a
folder of its own (``generated``, ``generated-2``, ...), a given ``--data.generate_dir`` that holds
anything (earlier images, any file) is refused (exit 2) before anything is generated, and a guidance scale far outside
what samples survive is refused like the server refuses it. A predict stopped mid-way by a real SIGTERM
exits 143 and leaves its folder and predictions file complete or absent, the earlier ones untouched."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import copy_run, run_pipeline


def predict(run, *extra: str) -> None:
    run_pipeline("media", "predict", "--runs_dir", str(run.parent.parent), "--run_id", run.name, "--ckpt_path", "best", "--data.num_generate=3", *extra)


def test_each_predict_writes_a_new_folder_and_a_full_one_is_refused(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run("media"), tmp_path / "runs")
    predict(run)
    predict(run)
    first, second = pd.read_csv(run / "predictions.csv"), pd.read_csv(run / "predictions-2.csv")
    assert {p.rsplit("/", 2)[-2] for p in first["file"]} == {"generated"} and {p.rsplit("/", 2)[-2] for p in second["file"]} == {"generated-2"}
    earlier = {p: open(p, "rb").read() for p in first["file"]}
    assert not list(run.glob("generated*/.*partial*")), "no partial image left behind"
    configs = {p.name: p.read_bytes() for p in run.glob("config-predict*.yaml")}  # each predict's own, numbered like its predictions file
    assert sorted(configs) == ["config-predict-2.yaml", "config-predict.yaml"], sorted(configs)

    with pytest.raises(SystemExit) as refused:  # the first predict's folder, given by name: refused, nothing generated
        predict(run, f"--data.generate_dir={run / 'generated'}")
    err = " ".join(capsys.readouterr().err.split())
    assert refused.value.code == 2 and "already holds 3 image(s) (00000.png, ...): predict writes only into a new or empty folder" in err, err
    assert not (run / "predictions-3.csv").exists() and {p: open(p, "rb").read() for p in first["file"]} == earlier

    notes = tmp_path / "notes"  # a folder holding no image but a file: refused too, before anything is generated (was: generated, then exit 1)
    notes.mkdir()
    (notes / "a.txt").write_text("mine")
    with pytest.raises(SystemExit) as refused:
        predict(run, f"--data.generate_dir={notes}")
    err = " ".join(capsys.readouterr().err.split())
    assert refused.value.code == 2 and f"--data.generate_dir {notes} already holds 1 file(s) or folder(s) (a.txt, ...)" in err, err
    assert [p.name for p in notes.iterdir()] == ["a.txt"] and not (run / "predictions-3.csv").exists()

    with pytest.raises(SystemExit) as refused:  # a file where the folder should be
        predict(run, f"--data.generate_dir={run / 'predictions.csv'}")
    assert refused.value.code == 2 and "not a folder" in " ".join(capsys.readouterr().err.split())
    assert {p: open(p, "rb").read() for p in first["file"]} == earlier

    with pytest.raises(SystemExit) as refused:
        predict(run, "--data.generate_guidance_scale=1e9")
    assert refused.value.code == 2 and "must be a number in 0..20" in " ".join(capsys.readouterr().err.split())
    # the refused predicts wrote no config and replaced none (before: each rewrote the one config-predict.yaml)
    assert {p.name: p.read_bytes() for p in run.glob("config-predict*.yaml")} == configs


def outputs(run: Path) -> dict[str, bytes]:
    """Every predict output of ``run`` (generated folders, predictions files, hidden partial ones too) by relative path."""
    found = [*run.glob("*generated*/**/*"), *run.glob("*predictions*")]
    return {str(p.relative_to(run)): p.read_bytes() for p in found if p.is_file()}


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_mid_predict_exits_honestly_leaves_nothing_half_written_and_keeps_the_earlier_predict(tiny_run, tmp_path, capsys, name, code):
    """A real SIGTERM (as a scheduler sends it) or SIGINT (Ctrl+C) to this process once the second predict's first image
    is on disk (of 20000: seconds before the end): exit 143 / 130 with the paragraph naming the signal, neither
    ``generated-2/`` nor ``predictions-2.csv`` nor any partial file left, the first predict's files unchanged.
    (Before, Lightning's prediction loop only noted the SIGTERM: predict ran to the end and exited 0; a Ctrl+C
    exited 1, the crash code, with no paragraph: trial finding.) In-process, so it costs no interpreter start-up: the
    signal goes to this process only while Lightning's SIGTERM handler is installed (inside its run, never to pytest
    itself); the same stop of a ``python -m pipelines.run media predict`` child is in the media README."""
    run = copy_run(tiny_run("media"), tmp_path / "runs")
    predict(run)
    earlier = outputs(run)
    configs = {p.name: p.read_bytes() for p in run.glob("config-predict*.yaml")}  # each completed predict's config
    assert sorted(earlier) == ["generated/00000.png", "generated/00001.png", "generated/00002.png", "predictions.csv"]
    finished, sent = threading.Event(), []

    def stop_at_the_first_image() -> None:
        deadline = time.monotonic() + 120
        while not finished.is_set() and time.monotonic() < deadline:
            if list(run.glob(".generated-2.partial-*/*.png")):
                if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):  # Lightning's, not pytest's
                    os.kill(os.getpid(), getattr(signal, name))
                    sent.append(True)
                return
            time.sleep(0.002)

    thread = threading.Thread(target=stop_at_the_first_image, daemon=True)
    thread.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            predict(run, "--data.num_generate=20000")
    finally:
        finished.set()
        thread.join()
    err = " ".join(capsys.readouterr().err.split())
    assert sent, "the signal was not sent (no image appeared, or no SIGTERM handler was installed during predict)"
    assert stopped.value.code == code and f"media predict stopped by {name}" in err, (stopped.value.code, err[-3000:])
    assert outputs(run) == earlier, "the stopped predict left files of its own or changed the earlier predict's"
    assert not list(run.glob(".*partial*")), "no staging folder or partial predictions file is left behind"
    assert {p.name: p.read_bytes() for p in run.glob("config-predict*.yaml")} == configs, "the stopped predict wrote no config and replaced none"
