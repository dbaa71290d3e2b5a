"""The shared runner: dispatch, configuration precedence, hardware choice, run folders and real DDP."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.hardware import plan_hardware
from pipelines.run_folder import new_run_id, resolve_run
from tests.conftest import ROOT, kill_at_first_checkpoint, only_run, run_pipeline, run_pipeline_process
from tests.wandb_offline import history, run_file

TINY = (
    "--data.synthetic_samples=64", "--data.batch_size=8", "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
)  # fmt: skip


def test_unknown_domain_lists_the_registered_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline("healthcar")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown domain 'healthcar'" in err and "registered domains: autonomous, finance, healthcare, media" in err


def test_no_domain_prints_usage_and_domains(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline()
    assert exit_info.value.code == 2
    out = capsys.readouterr().out
    assert "usage:" in out and "healthcare" in out


def test_unknown_option_fails_before_training_with_the_valid_options(capsys, runs_dir):
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline("healthcare", "--model.netwrk", "resnet18", "--runs_dir", str(runs_dir))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "unrecognized arguments: --model.netwrk" in err and "--model.network" in err
    assert not runs_dir.exists()


def test_invalid_choice_names_the_option_and_the_choices(capsys):
    with pytest.raises(SystemExit):
        run_pipeline("healthcare", "--model.network", "resnet99", "--print_config")
    err = capsys.readouterr().err
    assert "model.network" in err and "densenet121" in err


def test_config_precedence_default_then_user_file_then_cli_then_env(tmp_path, capsys, monkeypatch):
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"model": {"lr": 0.05}, "data": {"batch_size": 12}, "trainer": {"max_epochs": 3}}))
    monkeypatch.setenv("PIPELINES_FIT__DATA__SPLIT_SEED", "5")
    with pytest.raises(SystemExit):
        run_pipeline("healthcare", "--config", str(user), "--model.lr", "0.07", "--print_config")
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["lr"] == 0.07  # CLI beats the user file
    assert config["data"]["batch_size"] == 12 and config["trainer"]["max_epochs"] == 3  # user file beats defaults
    assert config["model"]["network"] == "resnet18"  # domain default kept
    assert config["data"]["split_seed"] == 5  # environment variable


def test_presets_parse(capsys):
    presets = sorted(Path(__file__).resolve().parents[1].joinpath("pipelines", "configs").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"debug", "ddp_sim", "gpu"}
    for preset in presets:
        with pytest.raises(SystemExit) as exit_info:
            run_pipeline("healthcare", "--config", str(preset), "--print_config")
        assert exit_info.value.code in (0, None), preset
        assert yaml.safe_load(capsys.readouterr().out)["trainer"]


# ----- hardware -----------------------------------------------------------------------------------
def test_cpu_plan_is_32_bit_single_process():
    plan = plan_hardware({"accelerator": "cpu"}, environ={})
    assert plan.settings == {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true"}
    assert "precision=32-true" in plan.summary


def test_auto_plan_on_this_machine_matches_what_is_here():
    plan = plan_hardware({}, environ={})
    if torch.cuda.is_available():
        assert plan.settings["precision"] in ("bf16-mixed", "16-mixed")
    else:
        assert plan.settings["accelerator"] == "cpu" and plan.settings["precision"] == "32-true"


def test_several_cpu_processes_get_ddp_and_explicit_settings_win():
    plan = plan_hardware({"accelerator": "cpu", "devices": 2}, environ={})
    assert plan.settings["strategy"] == "ddp" and plan.settings["devices"] == 2
    plan = plan_hardware({"accelerator": "cpu", "devices": 2, "strategy": "fsdp", "precision": "bf16-mixed"}, environ={})
    assert plan.settings["strategy"] == "fsdp" and plan.settings["precision"] == "bf16-mixed"


def test_slurm_task_count_mismatch_fails_fast_with_the_numbers():
    with pytest.raises(ValueError, match=r"SLURM launched 8 tasks .* devices x num_nodes = 4"):
        plan_hardware({"accelerator": "cpu", "devices": 2, "num_nodes": 2}, environ={"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "train"})
    plan = plan_hardware({"accelerator": "cpu", "devices": 4, "num_nodes": 2}, environ={"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "train"})
    assert "SLURM launch" in plan.summary


def test_torchrun_world_size_mismatch_fails_fast():
    environ = {"WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "job1"}
    with pytest.raises(ValueError, match=r"WORLD_SIZE=4 .* = 2"):
        plan_hardware({"accelerator": "cpu", "devices": 2}, environ=environ)


# ----- run folders --------------------------------------------------------------------------------
def test_last_without_a_checkpoint_starts_fresh_and_best_is_an_error(tmp_path):
    run = resolve_run("healthcare", tmp_path, None, "last", environ={})
    assert run.ckpt_path is None and run.path.parent == tmp_path / "healthcare"
    with pytest.raises(ValueError, match="best.ckpt"):
        resolve_run("healthcare", tmp_path, None, "best", environ={})


def test_last_picks_the_newest_run_and_keeps_its_id(tmp_path):
    for run_id in ("old", "new"):
        ckpt = tmp_path / "healthcare" / run_id / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (1000 if run_id == "old" else 2000,) * 2)
    run = resolve_run("healthcare", tmp_path, None, "last", environ={})
    assert run.run_id == "new" and run.ckpt_path.endswith("new/checkpoints/last.ckpt")
    assert resolve_run("healthcare", tmp_path, "old", "last", environ={}).run_id == "old"
    explicit = resolve_run("healthcare", tmp_path, None, str(tmp_path / "healthcare/old/checkpoints/last.ckpt"), environ={})
    assert explicit.run_id == "old"


def test_run_id_comes_from_the_launcher(tmp_path):
    assert resolve_run("x", tmp_path, None, None, environ={"PIPELINES_RUN_ID": "abc"}).run_id == "abc"
    assert resolve_run("x", tmp_path, None, None, environ={"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "t"}).run_id == "slurm-77"
    assert resolve_run("x", tmp_path, "mine", None, environ={"SLURM_JOB_ID": "77"}).run_id == "mine"
    assert new_run_id() != new_run_id()


def test_missing_checkpoint_file_is_a_clear_error(capsys, runs_dir):
    with pytest.raises(SystemExit):
        run_pipeline("healthcare", "test", "--ckpt_path", "/nonexistent/model.ckpt", "--runs_dir", str(runs_dir))
    assert "no such checkpoint file" in capsys.readouterr().err


def test_commands_on_a_run_reuse_its_model_and_data_config(runs_dir, capsys):
    """test/predict on a run and fit resumes need no retyping of the run's options; the CLI still wins."""
    run_pipeline(
        "healthcare", "fit", *TINY, "--model.network=resnet10", "--model.width=0.5", "--data.synthetic_image_size=28",
        "--runs_dir", str(runs_dir), "--run_id", "r1", "--trainer.limit_test_batches=1",
    )  # fmt: skip
    run = runs_dir / "healthcare" / "r1"
    fitted = (run / "config.yaml").read_text()
    # a resnet18 default would not load the resnet10 checkpoint: the run's model section must be reused
    run_pipeline("healthcare", "test", "--runs_dir", str(runs_dir), "--run_id", "r1", "--ckpt_path", "best",
                 "--trainer.limit_test_batches=1", "--data.batch_size=4")  # fmt: skip
    assert "using model, data from" in capsys.readouterr().err
    tested = yaml.safe_load((run / "config-test.yaml").read_text())
    assert tested["model"]["network"] == "resnet10" and tested["model"]["width"] == 0.5
    assert tested["data"]["synthetic_image_size"] == 28
    assert tested["data"]["synthetic_samples"] == 64 and tested["data"]["batch_size"] == 4  # the command line wins
    assert (run / "config.yaml").read_text() == fitted  # the fit config is never overwritten by other commands
    run_pipeline("healthcare", "fit", "--runs_dir", str(runs_dir), "--run_id", "r1", "--ckpt_path", "last", "--trainer.max_epochs=2")
    resumed = yaml.safe_load((run / "config.yaml").read_text())
    assert resumed["model"]["network"] == "resnet10" and resumed["trainer"]["limit_train_batches"] == 2
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


# ----- real DDP on CPU (gloo) ---------------------------------------------------------------------
# slow (~50 s of the default suite's two cores: two ranks for 3 epochs, then the one-process test): run with
# `python -m benchmarks.slow_checks -k two_process_ddp_on_cpu`. The default suite keeps a real 2-process DDP fit
# in tests/test_finance_streaming.py (both ranks stream one cache, each trains on its half).
@pytest.mark.slow
def test_two_process_ddp_on_cpu_writes_one_run_and_one_wandb_run_and_learns(runs_dir, tmp_path):
    # 207 synthetic images, 3 epochs of 5 steps per rank: enough to learn, measured on the whole test split (31 images: odd,
    # so a padding sampler would score one twice; tests/test_ddp_evaluation.py does the other domains)
    counts = tmp_path / "counts"
    result = run_pipeline_process(
        "healthcare", "--data.synthetic_samples=207", "--data.batch_size=16", "--data.augment=null", "--trainer.max_epochs=3",
        "--trainer.limit_val_batches=1", "--model.network=resnet10", "--model.width=0.25",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--runs_dir", str(runs_dir),
        "--trainer.callbacks+=tests.helpers.CountEvaluatedRows", f"--trainer.callbacks.folder={counts}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    run = only_run(runs_dir, "healthcare")
    assert len(list(run.glob("wandb/offline-run-*"))) == 1, "DDP must create exactly one W&B run (rank zero)"
    provenance = json.loads((run / "provenance.json").read_text())
    assert len(provenance["invocations"]) == 1 and "strategy=ddp" in provenance["invocations"][0]["hardware"]
    summary = json.loads((run / "summary.json").read_text())
    # it learned: chance is 0.5 (the default 6-epoch run reaches 0.98; this one measured 0.84), computed over both ranks' shards
    assert summary["test"]["test/auroc"] >= 0.75, summary["test"]
    assert summary["global_step"] == 15, "each rank trains on its half of the 10 batches an epoch"
    assert any("val/auroc" in row for row in history(run_file(run)))
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    scored = [json.loads((counts / f"rank{rank}.json").read_text())["test"] for rank in (0, 1)]
    assert [rows for rows, _ in scored] == [16, 15] and scored[0][1] == 31, "each test image scored once, by one process"
    # the same checkpoint tested in one process: the same metrics, test/loss (a class-weighted cross-entropy, a mean over
    # the targets' class weights) included: the processes' 16 and 15 images are weighted as one split's (pipelines/evaluation_means.py)
    run_pipeline("healthcare", "test", "--runs_dir", str(runs_dir), "--run_id", run.name, "--ckpt_path", "best", "--trainer.devices", "1")
    one_process = json.loads((run / "summary.json").read_text())["test"]
    assert summary["test"].keys() == one_process.keys() and "test/loss" in one_process
    assert summary["test"] == pytest.approx(one_process, rel=1e-5, abs=1e-6)


def test_help_is_served_from_a_cache_keyed_on_the_code(tmp_path, monkeypatch, capsys):
    """The help is rendered in this process (the parser's imports are paid once here, not by two more
    interpreters) and cached; a fresh interpreter is then served from the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name in [name for name in os.environ if name.startswith("PIPELINES_")]:  # part of the key: the child starts without them
        monkeypatch.delenv(name)

    def help_in_this_process() -> str:
        with pytest.raises(SystemExit) as done:
            run_pipeline("healthcare", "--help")
        assert done.value.code in (0, None)
        return capsys.readouterr().out

    first = help_in_this_process()
    assert "--data.npz_path" in first
    cached = list((tmp_path / "domain-pipelines" / "help").glob("healthcare-*.txt"))
    assert len(cached) == 1 and cached[0].read_text() == first
    second = run_pipeline_process("healthcare", "--help", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert second.returncode == 0 and second.stdout == first
    # another key (an environment variable of the CLI) renders again and caches a second entry
    monkeypatch.setenv("PIPELINES_FIT__DATA__BATCH_SIZE", "7")
    help_in_this_process()
    assert len(list(cached[0].parent.glob("healthcare-*.txt"))) == 2
    # the same files in another checkout: another key (its help names that checkout's config file)
    import shutil

    from pipelines.help_cache import _cache_key

    here = ROOT / "domains" / "healthcare"
    elsewhere = Path(shutil.copytree(here, tmp_path / "other-checkout" / "healthcare", ignore=shutil.ignore_patterns("__pycache__")))
    assert _cache_key(here, ["--help"]) != _cache_key(elsewhere, ["--help"])


#: healthcare on 64 small synthetic images with a ResNet-10: one epoch, one validation batch
SMALL_RESNET = (
    "--model.network=resnet10", "--model.width=0.25", "--data.synthetic_samples=64", "--data.synthetic_image_size=16", "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
)  # fmt: skip


def test_compile_compiles_the_networks_in_place_and_keeps_checkpoint_keys(runs_dir, capsys):
    import torch._dynamo
    from torch._dynamo.utils import counters

    counters.clear()
    suppress_errors = torch._dynamo.config.suppress_errors
    run_pipeline("healthcare", "fit", "--compile=true", *SMALL_RESNET, "--data.batch_size=16", "--trainer.limit_train_batches=2", "--runs_dir", str(runs_dir))
    assert "torch.compile: network" in capsys.readouterr().err
    # graphs were captured and compiled by inductor, with no frame falling back to eager
    assert counters["stats"]["unique_graphs"] >= 1 and counters["frames"]["ok"] == counters["frames"]["total"] >= 1
    assert counters["inductor"], "nothing reached the inductor backend"
    state = torch.load(only_run(runs_dir, "healthcare") / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "network.conv1.weight" in state and not any("_orig_mod" in key for key in state)
    assert torch._dynamo.config.suppress_errors == suppress_errors, "the eager fallback outlived the command"


def test_batch_size_finder_runs_and_its_result_becomes_the_runs_config(runs_dir, capsys):
    run_pipeline("healthcare", "fit", "--scale_batch_size=power", *SMALL_RESNET, "--data.batch_size=2", "--runs_dir", str(runs_dir))
    run = only_run(runs_dir, "healthcare")
    config = yaml.safe_load((run / "config.yaml").read_text())
    # doubling from 2 stops at the training split's size (44 of 64 images): 64 is the first too large
    assert config["data"]["batch_size"] == 64 and config["scale_batch_size"] == "none"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["datamodule_hyper_parameters"]["batch_size"] == 64
    assert "batch size 64 (Tuner)" in capsys.readouterr().err


def test_learning_rate_finder_trains_with_its_suggestion_and_records_it(runs_dir, capsys):
    # 400 images, batch 16: 17 steps an epoch, so 7 epochs give the range test its 100 learning rates
    run_pipeline(
        "healthcare", "fit", "--lr_find=true", "--model.network=resnet10", "--model.width=0.25", "--data.synthetic_samples=400",
        "--data.synthetic_image_size=16", "--data.batch_size=16", "--trainer.max_epochs=7", "--trainer.limit_val_batches=2",
        "--runs_dir", str(runs_dir),
    )  # fmt: skip
    run = only_run(runs_dir, "healthcare")
    config = yaml.safe_load((run / "config.yaml").read_text())
    found = config["model"]["lr"]
    assert found != 0.002 and 1e-6 < found < 1 and config["lr_find"] is False  # a resume does not search again
    assert f"learning rate {found:.3g} (Tuner)" in capsys.readouterr().err
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["hyper_parameters"]["lr"] == found
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(found)
    assert (run / "plots" / "tuner_lr_find.png").is_file()
    assert any(key.startswith("tuner/lr_find/") for row in history(run_file(run)) for key in row)  # the curve, as a W&B image

    # resuming neither searches again nor changes the learning rate found, even when asked to
    run_pipeline("healthcare", "fit", "--lr_find=true", "--ckpt_path=last", "--run_id", run.name, "--trainer.max_epochs=8", "--runs_dir", str(runs_dir))
    assert "--scale_batch_size and --lr_find are skipped" in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["lr"] == found


def test_learning_rate_finder_refuses_a_model_with_two_learning_rates(runs_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline("media", "fit", "--lr_find=true", "--data.synthetic_samples=32", "--data.image_size=16", "--runs_dir", str(runs_dir))
    assert exit_info.value.code == 2 and not runs_dir.exists()
    assert re.search(r"--lr_find needs a model with one learning rate .* GAN has \['lr_discriminator', 'lr_generator'\]", capsys.readouterr().err.replace("\n  ", " "))


def test_early_stopping_stops_when_the_monitored_metric_stalls(runs_dir):
    # lr 1e-30 (0 is refused): AdamW's step is below float32 precision, so the weights and val/loss never change
    run_pipeline("finance", "fit", "--early_stopping_patience=2", "--model.lr=1e-30", "--data.synthetic_rows=1200", "--trainer.max_epochs=20", "--runs_dir", str(runs_dir))
    summary = json.loads((only_run(runs_dir, "finance") / "summary.json").read_text())
    assert summary["epochs"] == 3  # best at epoch 0, then 2 validations without improvement


def test_early_stopping_patience_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        run_pipeline("finance", "fit", "--early_stopping_patience=0")
    assert "--early_stopping_patience must be at least 1" in capsys.readouterr().err


def test_checkpoint_every_n_steps_lets_a_run_killed_mid_epoch_resume(runs_dir):
    args = [
        "finance", "fit", "--data.synthetic_rows=1200", "--data.batch_size=64", "--trainer.max_epochs=1", "--trainer.limit_train_batches=8",
        "--checkpoint_every_n_steps=3", "--runs_dir", str(runs_dir),
        "--trainer.callbacks+=tests.helpers.PauseEachBatch", "--trainer.callbacks.seconds=0.3",
    ]  # fmt: skip
    kill_at_first_checkpoint(args, "finance/*/checkpoints/last.ckpt", runs_dir, settle=0.2)  # settle: let the write finish
    run = only_run(runs_dir, "finance")
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["global_step"] == 3 and saved["epoch"] == 0  # mid-epoch: the epoch has 8 steps

    run_pipeline(*args, "--ckpt_path", "last")  # in this process: only the killed run needs its own
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == 8


def test_step_saves_after_an_epochs_save_write_the_one_last_ckpt(runs_dir):
    """An epoch's save writes last.ckpt first (2 steps), the step save (step 3) comes later: it must write last.ckpt too,
    not a last-v1.ckpt that ``--ckpt_path last`` would never resume from (media's default run saves every 100 steps)."""
    run_pipeline("finance", "fit", "--data.synthetic_rows=1200", "--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
                 "--checkpoint_every_n_steps=3", "--runs_dir", str(runs_dir))  # fmt: skip
    checkpoints = only_run(runs_dir, "finance") / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == 4


def test_a_fit_without_validation_says_the_test_scores_the_last_weights(runs_dir, capfd):
    run_pipeline("finance", "--data.synthetic_rows=1200", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                 "--trainer.check_val_every_n_epoch=2", "--runs_dir", str(runs_dir))  # fmt: skip
    said = " ".join(capfd.readouterr().err.split())
    assert "val/loss was never computed (no validation ran: check_val_every_n_epoch 2, 1 epoch(s) trained" in said, said[-1500:]
    assert "there is no best.ckpt; the test scores the last weights" in said
    summary = json.loads((only_run(runs_dir, "finance") / "summary.json").read_text())
    assert summary["best_checkpoint"] is None and summary["test"]


def test_wandb_watch_logs_gradient_and_parameter_histograms(runs_dir):
    run_pipeline(
        "finance", "fit", "--wandb_watch=all", "--data.synthetic_rows=1200", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
        "--trainer.log_every_n_steps=2", "--runs_dir", str(runs_dir),
    )  # fmt: skip
    run = only_run(runs_dir, "finance")
    rows = history(run_file(run))
    keys = set().union(*rows)
    kinds = {kind: any(k.startswith(f"{kind}/network.") for k in keys) for kind in ("gradients", "parameters")}
    steps = [(row.get("_step"), row.get("trainer/global_step"), sorted(k.split("/")[0] for k in row if "/network." in k)[:1]) for row in rows]
    assert all(kinds.values()), f"{kinds}; rows (_step, global_step, histograms): {steps}; keys: {', '.join(sorted(keys))}"
