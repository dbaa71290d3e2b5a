"""``export --model_name/--model_version`` and ``serve --model_name/--model_version``: the served
model's name and version, from a real tiny run exported and served by the real commands.

The happy path: the bundle records the names, ``/info`` and every answer's ``X-Model-*`` headers show
them, and a ``serve`` option overrides the bundle's. Bad labels (empty, a line break that would inject
a header, non-ASCII text a header cannot carry, too long) are refused with exit 2 before a bundle is
written or a server starts.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported at collection: its log handler must bind the session's stderr)
import pytest

from domains.finance.synthetic import make_card_transactions
from tests.conftest import only_run, run_pipeline
from tests.helpers import REQUEST_TIMEOUT, start_server

TINY = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--data.batch_size=64", "--model.hidden_dims=[8]", "--model.latent_dim=2")
BAD_LABELS = [("empty", ""), ("line-break", "v1\r\nX-Admin: yes"), ("non-ascii", "modèle-α"), ("too-long", "v" * 129), ("padded", " v1")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(runs folder, run folder, the bundle exported with a name and version)."""
    folder = tmp_path_factory.mktemp("identity")
    make_card_transactions(300, fraud_rate=0.05, seed=0).to_csv(folder / "train.csv", index=False)
    runs = folder / "runs"
    run_pipeline("finance", "fit", "--data.path", str(folder / "train.csv"), *TINY, "--runs_dir", str(runs), "--trainer.logger=false")
    run = only_run(runs, "finance")
    bundle = folder / "bundle"
    run_pipeline("finance", "export", "--runs_dir", str(runs), "--run_id", run.name, "--ckpt_path", "best", "--output", str(bundle),
                 "--model_name", "fraud-detector", "--model_version", "2026.11.30-rc1")  # fmt: skip
    return runs, run, bundle


def test_export_records_the_name_and_serve_shows_it_or_its_override(exported, tmp_path):
    runs, run, bundle = exported
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert (metadata["model_name"], metadata["model_version"]) == ("fraud-detector", "2026.11.30-rc1")
    server = start_server("finance", bundle, tmp_path / "server.log", "--model_version", "canary-7")
    try:
        with urllib.request.urlopen(server.url + "/info", timeout=REQUEST_TIMEOUT) as response:
            info = json.loads(response.read())["model"]
        assert (info["name"], info["version"]) == ("fraud-detector", "canary-7")  # the bundle's name, the command's version
        row = make_card_transactions(20, fraud_rate=0.0, seed=3).drop(columns=["is_fraud"]).astype(str).iloc[0].to_dict()
        request = urllib.request.Request(server.url + "/predict", data=json.dumps({"row": row}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            answer, headers = json.loads(response.read()), response.headers
        assert "score" in answer and answer["out_of_range"] == []
        assert (headers["X-Model-Name"], headers["X-Model-Version"]) == ("fraud-detector", "canary-7")
        assert headers["X-Model-Checkpoint-Sha256"] == metadata["source_checkpoint"]["sha256"]
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.output()


@pytest.mark.parametrize(("option", "value"), [(o, v) for o in ("--model_name", "--model_version") for _, v in BAD_LABELS],
                         ids=[f"{o[2:]}-{i}" for o in ("--model_name", "--model_version") for i, _ in BAD_LABELS])  # fmt: skip
def test_serve_refuses_a_label_it_cannot_send(exported, option, value, capsys):
    from pipelines.serve import main

    with pytest.raises(SystemExit) as exit_info:
        main(["finance", "--bundle", str(exported[2]), option, value, "--port", "8765"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{option} {value!r}" in err and "printable ASCII" in err, err


@pytest.mark.parametrize(("option", "value"), [(o, v) for o in ("--model_name", "--model_version") for _, v in BAD_LABELS[:3]],
                         ids=[f"{o[2:]}-{i}" for o in ("--model_name", "--model_version") for i, _ in BAD_LABELS[:3]])  # fmt: skip
def test_export_refuses_a_label_before_writing_a_bundle(exported, option, value, tmp_path, capsys):
    runs, run, _ = exported
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline("finance", "export", "--runs_dir", str(runs), "--run_id", run.name, "--ckpt_path", "best", "--output", str(tmp_path / "b"), option, value)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{option} {value!r}" in err, err
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())


def test_serve_refuses_a_bundle_whose_metadata_holds_a_bad_label(exported, tmp_path, capsys):
    import shutil

    from pipelines.serve import main

    bundle = tmp_path / "edited"
    shutil.copytree(exported[2], bundle)
    metadata = json.loads((bundle / "metadata.json").read_text())
    (bundle / "metadata.json").write_text(json.dumps({**metadata, "model_version": "v2\nSet-Cookie: x"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["finance", "--bundle", str(bundle), "--port", "8765"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "metadata.json model_version" in err, err
