"""Media ``predict`` never replaces images an earlier predictions file names: each predict writes a
folder of its own (``generated``, ``generated-2``, ...), a given ``--data.generate_dir`` that holds
earlier images is refused (exit 2) before anything is generated, and a guidance scale far outside
what samples survive is refused like the server refuses it."""

from __future__ import annotations

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

    with pytest.raises(SystemExit) as refused:  # the first predict's folder, given by name: refused, nothing generated
        predict(run, f"--data.generate_dir={run / 'generated'}")
    err = " ".join(capsys.readouterr().err.split())
    assert refused.value.code == 2 and "already holds 3 image(s) of an earlier predict" in err, err
    assert not (run / "predictions-3.csv").exists() and {p: open(p, "rb").read() for p in first["file"]} == earlier

    with pytest.raises(SystemExit) as refused:  # a file where the folder should be
        predict(run, f"--data.generate_dir={run / 'predictions.csv'}")
    assert refused.value.code == 2 and "not a folder" in " ".join(capsys.readouterr().err.split())
    assert {p: open(p, "rb").read() for p in first["file"]} == earlier

    with pytest.raises(SystemExit) as refused:
        predict(run, "--data.generate_guidance_scale=1e9")
    assert refused.value.code == 2 and "must be a number in 0..20" in " ".join(capsys.readouterr().err.split())
