"""Media models: real Trainers on tiny images (16x16) and few steps: GAN and diffusion training, resuming,
conditioning, predict through the CLI, the non-finite guards and the feature extractor."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from domains.media.data import MediaDataModule
from domains.media.model import GAN, Diffusion, NonFiniteLossError
from domains.media.diffusion_networks import build_diffusion_unet
from domains.media.networks import Discriminator, Generator
from domains.media.synthetic import make_shape_images
from pipelines.errors import InputError
from tests.conftest import only_run, read_jsonl, run_pipeline
from tests.helpers import QUIET, TINY_DIFFUSION, TINY_GAN, linked, shapes_module


def test_generator_width_widens_only_the_generator():
    """``generator_width`` sets the generator's last hidden layer; the discriminator keeps ``width``; ``null`` is ``width``."""
    geometry = {"image_size": 16, "in_channels": 3, "num_classes": 3}
    wide, plain = GAN(width=8, generator_width=24, **geometry), GAN(width=8, **geometry)
    for model in (wide, plain):
        model.configure_models()
    assert wide.generator.out[1].in_channels == 24 and plain.generator.out[1].in_channels == 8
    assert wide.discriminator.body[0].out_channels == plain.discriminator.body[0].out_channels == 8
    assert wide.ema_generator.out[1].in_channels == 24  # the EMA copy samples, so it has the generator's shape
    with pytest.raises(ValueError, match="generator_width must be >= 1"):
        GAN(width=8, generator_width=0, **geometry)


def test_generator_padding_reaches_every_convolution_and_a_bad_one_is_named():
    """``generator_padding`` sets the padding of every generator convolution (the EMA copy too); the class default stays
    ``zeros``, what checkpoints saved before the option were trained with; an unknown mode names the option."""
    geometry = {"image_size": 16, "in_channels": 3, "num_classes": 3}
    reflect, plain = GAN(width=8, generator_padding="reflect", **geometry), GAN(width=8, **geometry)
    for model in (reflect, plain):
        model.configure_models()
    convs = lambda g: [m for m in g.modules() if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    assert len(convs(reflect.generator)) == 2 and {c.padding_mode for c in convs(reflect.generator) + convs(reflect.ema_generator)} == {"reflect"}
    assert {c.padding_mode for c in convs(plain.generator)} == {"zeros"}
    assert {c.padding_mode for c in reflect.discriminator.modules() if isinstance(c, torch.nn.Conv2d)} == {"zeros"}
    with pytest.raises(InputError, match=r"--model.init_args.generator_padding 'mirror'.*zeros, reflect, replicate"):
        GAN(generator_padding="mirror", **geometry)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Generator(16, 18, 3), "multiple of 4"),
        (lambda: Discriminator(12, 1), "multiple of 4"),
        (lambda: build_diffusion_unet(18, 3, (16, 16, 16), (False, False, False), norm_num_groups=8), "multiple of 4"),
        (lambda: GAN(image_size=30), "set --data.image_size"),
        (lambda: Diffusion(image_size=30, unet_widths=[16, 16, 16], attention_levels=[False, False, False], norm_num_groups=8), "set --data.image_size"),
    ],
)
def test_image_size_the_network_cannot_take(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_image_size_error_comes_before_training_through_the_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # bad input: exit 2, one paragraph, nothing written
        run_pipeline("media", "--data.synthetic_samples=30", "--data.image_size=18", "--runs_dir", str(tmp_path), "--trainer.logger=false")
    assert exit_info.value.code == 2 and "image size 18 does not suit the DCGAN" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "media").exists()



# ----- models ---------------------------------------------------------------------------------------
def test_gan_trains_checkpoints_both_optimisers_and_resumes(tmp_path):
    dm = shapes_module(augment=[{"HorizontalFlip": {"p": 0.5}}])
    model = GAN(**TINY_GAN, **linked(dm))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, default_root_dir=tmp_path, **QUIET)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4  # manual optimisation: a discriminator and a generator step per batch
    first = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(first)
    state = torch.load(first, map_location="cpu", weights_only=True)
    assert len(state["optimizer_states"]) == 2
    steps = [int(next(iter(opt["state"].values()))["step"]) for opt in state["optimizer_states"]]
    assert steps == [2, 2]
    assert any(k.startswith("extractor.") for k in state["state_dict"]) and bool(state["state_dict"]["extractor_ready"])
    assert {"val/fid_cnn", "val/kid_cnn", "val/class_acc_cnn"} <= set(trainer.callback_metrics)

    resumed = GAN(**TINY_GAN, **linked(dm))
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, default_root_dir=tmp_path, **QUIET)
    trainer.fit(resumed, datamodule=dm, ckpt_path=first)
    assert trainer.global_step == 8
    final = tmp_path / "epoch2.ckpt"
    trainer.save_checkpoint(final)
    state = torch.load(final, map_location="cpu", weights_only=True)
    assert [int(next(iter(opt["state"].values()))["step"]) for opt in state["optimizer_states"]] == [4, 4]  # restored, not restarted
    # the extractor came from the checkpoint, not retrained: its weights are unchanged
    before = torch.load(first, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], v) for k, v in state["state_dict"].items() if k.startswith("extractor."))
    assert (tmp_path / "plots" / "samples" / "epoch_001.png").is_file()


def halves_npz(path: Path) -> Path:
    """Two classes a conditional generator must keep apart: the bright half of a 16x16 image is the top (0) or the bottom (1)."""

    def images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        pixels, labels = rng.integers(0, 60, (count, 16, 16), dtype=np.uint8), np.arange(count) % 2
        for image, label in zip(pixels, labels):
            image[:8] += np.uint8(180 * (label == 0))
            image[8:] += np.uint8(180 * (label == 1))
        return pixels, labels

    (x_train, y_train), (x_test, y_test) = images(256, 0), images(64, 1)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def test_conditional_gan_draws_the_requested_class(tmp_path):
    """Labels reach the GAN from the data module and are obeyed: the extractor, a classifier of the real
    classes, recognises the class of samples generated for the validation labels (chance: 0.5)."""
    pl.seed_everything(0, verbose=False)
    dm = MediaDataModule(npz_path=str(halves_npz(tmp_path / "halves.npz")), image_size=16, batch_size=32)
    model = GAN(**{**TINY_GAN, "fid_samples": 32, "extractor_steps": 10}, **linked(dm))
    trainer = pl.Trainer(max_epochs=8, default_root_dir=tmp_path, enable_checkpointing=False, **QUIET)
    trainer.fit(model, datamodule=dm)
    assert trainer.callback_metrics["val/class_acc_cnn"] >= 0.9
    model.eval()
    top, bottom = model.generate(list(range(16)), torch.zeros(16, dtype=torch.long)), model.generate(list(range(16)), torch.ones(16, dtype=torch.long))
    assert (top[:, :, :8].mean() - top[:, :, 8:].mean()) > 0.5 and (bottom[:, :, 8:].mean() - bottom[:, :, :8].mean()) > 0.5


def test_conditional_diffusion_with_velocity_prediction_draws_the_requested_class(tmp_path):
    """The same check for the diffusion model (v-prediction, cosine schedule, min-SNR weighting), 64 batches."""
    pl.seed_everything(0, verbose=False)
    dm = MediaDataModule(npz_path=str(halves_npz(tmp_path / "halves.npz")), image_size=16, batch_size=32)
    settings = {**TINY_DIFFUSION, "attention_levels": [False, False], "num_train_timesteps": 100, "eval_steps": 10, "fid_samples": 32,
                "extractor_steps": 10, "lr": 2e-3, "ema_decay": 0.9, "prediction_type": "v_prediction"}  # fmt: skip
    model = Diffusion(**settings, **linked(dm))
    assert (model.ddpm.prediction_type, model.hparams.schedule, model.hparams.snr_gamma) == ("v_prediction", "cosine", 5.0)
    trainer = pl.Trainer(max_epochs=8, default_root_dir=tmp_path, enable_checkpointing=False, **QUIET)
    trainer.fit(model, datamodule=dm)
    assert trainer.callback_metrics["val/class_acc_cnn"] >= 0.8


def test_diffusion_trains_conditionally_samples_with_ema_and_ddim(tmp_path):
    dm = shapes_module()
    model = Diffusion(**TINY_DIFFUSION, **linked(dm))
    assert model.unet.num_class_embeds == 3
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1, default_root_dir=tmp_path, **QUIET)
    trainer.fit(model, datamodule=dm)
    assert {"val/loss", "val/fid_cnn", "val/kid_cnn"} <= set(trainer.callback_metrics)
    raw, ema = model.unet.state_dict(), model.ema_unet.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    model.eval()
    ddim = model.generate([1, 2, 3], torch.tensor([0, 1, 2]), steps=3)
    assert ddim.shape == (3, 3, 16, 16) and ddim.abs().max() <= 1
    assert torch.equal(ddim, model.generate([1, 2, 3], torch.tensor([0, 1, 2]), steps=3))  # seeded and deterministic
    assert not torch.equal(ddim[0], model.generate([1], torch.tensor([1]), steps=3)[0])  # the class matters
    ddpm = model.generate([1, 2], None, sampler="ddpm")  # all 40 training steps
    assert ddpm.shape == (2, 3, 16, 16) and torch.isfinite(ddpm).all()
    trainer.test(model, datamodule=dm)
    assert "test/fid_cnn" in trainer.callback_metrics


def test_diffusion_val_loss_of_one_checkpoint_is_the_same_at_every_batch_size(tmp_path):
    """Each validation image's noise and timestep came from a generator seeded by the batch's number: the same
    checkpoint scored another val/loss at another batch size (or under DDP). Now drawn per image from its index."""
    model = Diffusion(**TINY_DIFFUSION, **linked(shapes_module()))
    losses = []
    for batch_size in (4, 7, 7):
        trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, **QUIET)
        losses.append(trainer.validate(model, datamodule=shapes_module(batch_size=batch_size), verbose=False)[0]["val/loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[1] == pytest.approx(losses[2], rel=1e-6), losses


def test_diffusion_through_the_cli_with_predict(runs_dir, capsys):
    args = ["--model", "domains.media.model.Diffusion", *[f"--model.init_args.{k}={json.dumps(v)}" for k, v in TINY_DIFFUSION.items()]]
    data = ["--data.synthetic_samples=60", "--data.image_size=16", "--data.batch_size=8", "--data.num_generate=5", "--trainer.logger=false"]
    limits = ["--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    run_pipeline("media", *args, *data, *limits, "--runs_dir", str(runs_dir))
    run = only_run(runs_dir, "media")
    rows = read_jsonl(run / "metrics.jsonl")
    assert "val/fid_cnn" in rows[0] and "val/loss" in rows[0] and rows[-1]["stage"] == "test"
    run_pipeline("media", "predict", *args, *data, "--data.generate_steps=2", "--runs_dir", str(runs_dir), "--ckpt_path", "best", "--run_id", run.name)
    files = sorted((run / "generated").glob("*.png"))
    assert [p.name for p in files] == [f"{i:05d}.png" for i in range(5)]
    assert np.asarray(Image.open(files[0])).shape == (16, 16, 3)
    ddim = [p.read_bytes() for p in files]

    # the sampler is a data option: predict --ckpt_path replaces model options with the checkpoint's
    import pandas as pd

    with pytest.raises(SystemExit) as refused:  # the old model option is gone: refused, not silently dropped
        run_pipeline("media", "predict", *args, *data, "--model.init_args.sampler=ddpm", "--runs_dir", str(runs_dir), "--ckpt_path", "best", "--run_id", run.name)
    err = " ".join(capsys.readouterr().err.split())
    assert refused.value.code == 2 and "--model.init_args.sampler: with --ckpt_path the model and its options come from the checkpoint" in err, err
    ddpm_dir = runs_dir / "ddpm"
    run_pipeline("media", "predict", *args, *data, "--data.generate_sampler=ddpm", f"--data.generate_dir={ddpm_dir}", "--output=ddpm.csv",
                 "--runs_dir", str(runs_dir), "--ckpt_path", "best", "--run_id", run.name)  # fmt: skip
    rows = pd.read_csv(run / "ddpm.csv")
    assert set(rows["sampler"]) == {"ddpm"} and set(rows["steps"]) == {TINY_DIFFUSION["num_train_timesteps"]}
    assert set(pd.read_csv(run / "predictions.csv")["sampler"]) == {"ddim"}
    assert [p.read_bytes() for p in sorted(ddpm_dir.glob("*.png"))] != ddim  # other images from the same seeds


def test_predict_writes_the_same_seeded_images_twice(runs_dir, tmp_path):
    common = ["--data.synthetic_samples=60", "--data.image_size=16", "--data.batch_size=8", "--data.num_generate=6", "--trainer.logger=false",
              *[f"--model.init_args.{k}={v}" for k, v in TINY_GAN.items()]]  # fmt: skip
    run_pipeline("media", *common, "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                 "--trainer.limit_test_batches=1", "--runs_dir", str(runs_dir))  # fmt: skip
    run = only_run(runs_dir, "media")
    outputs = []
    for name in ("first", "second"):
        folder = tmp_path / name
        run_pipeline("media", "predict", *common, f"--data.generate_dir={folder}", "--runs_dir", str(runs_dir), "--ckpt_path", "best", "--run_id", run.name)
        outputs.append([p.read_bytes() for p in sorted(folder.glob("*.png"))])
    assert len(outputs[0]) == 6 and outputs[0] == outputs[1]
    import pandas as pd

    table = pd.read_csv(run / "predictions.csv")
    assert list(table["class"]) == ["circle", "square", "triangle"] * 2 and table["seed"].tolist() == list(range(6))
    assert len({hash(b) for b in outputs[0]}) == 6  # six different images


def test_nan_loss_stops_with_the_step_and_a_checkpoint_from_before(tmp_path):
    dm = shapes_module()
    model = GAN(**{**TINY_GAN, "lr_generator": 1e30, "lr_discriminator": 1e30}, **linked(dm))
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=1, default_root_dir=tmp_path, **QUIET)
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* at global step \d+") as error:
        trainer.fit(model, datamodule=dm)
    saved = list((tmp_path / "checkpoints").glob("before-nonfinite-step*.ckpt"))
    assert len(saved) == 1 and saved[0].name in str(error.value)
    state = torch.load(saved[0], map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("generator.") and v.is_floating_point())


@pytest.mark.parametrize("model_class, config", [(GAN, TINY_GAN), (Diffusion, TINY_DIFFUSION)], ids=["gan", "diffusion"])
def test_nan_guard_names_the_network_and_keeps_the_weights(tmp_path, model_class, config):
    dm = shapes_module()
    rates = {"lr_generator": 1e30, "lr_discriminator": 1e30} if model_class is GAN else {"lr": 1e30}
    model = model_class(**{**config, **rates}, **linked(dm))
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=0, default_root_dir=tmp_path, **QUIET)
    with pytest.raises(NonFiniteLossError, match=r"non-finite (discriminator|generator|diffusion) (loss|gradient)") as error:
        trainer.fit(model, datamodule=dm)
    assert "before-nonfinite-step" in str(error.value)


@pytest.mark.parametrize("model_class, config", [(GAN, TINY_GAN), (Diffusion, TINY_DIFFUSION)], ids=["gan", "diffusion"])
def test_fp16_loss_scaler_overflow_is_skipped_not_a_divergence(tmp_path, model_class, config):
    """Under ``16-mixed`` the first steps' scaled gradients overflow by design; the scaler skips them."""
    from lightning.pytorch.plugins import MixedPrecision

    dm = shapes_module()
    model = model_class(**config, **linked(dm))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # overflows fp16 gradients for the first steps
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, default_root_dir=tmp_path, plugins=[plugin], **QUIET)
    trainer.fit(model, datamodule=dm)
    assert scaler.get_scale() < 2.0**60, "no step overflowed, so this test checks nothing"


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_feature_extractor_trains_inside_an_evaluation_loop(context):
    """Lightning's learning-rate finder validates before the model's on_fit_start, so the extractor
    is first trained from on_validation_start, inside the loop's no-grad context."""
    from domains.media.features import train_feature_cnn

    images, labels = make_shape_images(48, size=16, seed=0)  # (N, H, W, 3) uint8
    images = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with context():
        net = train_feature_cnn(images, torch.as_tensor(labels), steps=3, width=8)
    assert net.task == "classes" and all(p.requires_grad for p in net.parameters())


def test_inception_metrics_need_torch_fidelity_and_say_so():
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed here: the online Inception path would try to download weights")
    with pytest.raises(ValueError, match=r"inception_metrics=true needs torch-fidelity .*offline metrics \(val/fid_cnn\)"):
        GAN(image_size=16, inception_metrics=True)


