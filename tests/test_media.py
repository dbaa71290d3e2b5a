"""Media domain: real image files written here, real Trainers, tiny images (16x16) and few steps."""

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
from domains.media.networks import Discriminator, Generator, build_diffusion_unet
from domains.media.synthetic import make_shape_images
from tests.conftest import only_run, read_jsonl, run_pipeline, shared_file
from tests.helpers import QUIET, TINY_DIFFUSION, TINY_GAN, decode_pngs, linked, request, save_checkpoint, shapes_module, start_server

def write_png(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


# ----- data ---------------------------------------------------------------------------------------
def test_synthetic_shapes_are_deterministic_per_item():
    images, labels = make_shape_images(12, size=16, seed=3)
    again, _ = make_shape_images(12, size=16, seed=3)
    other, _ = make_shape_images(12, size=16, seed=4)
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    assert images.shape == (12, 16, 16, 3) and set(labels.tolist()) <= {0, 1, 2}
    # a saturated shape stands out from the muted background in at least one colour channel
    assert (images.std(axis=(1, 2)).max(axis=1) > 20).all()


def test_folder_with_class_subfolders_resizes_and_mixes_gray_into_rgb(tmp_path):
    write_png(tmp_path / "cats" / "a.png", (20, 24), "RGB", 1)
    write_png(tmp_path / "cats" / "b.png", (40, 40), "L", 2)
    (tmp_path / "dogs").mkdir()
    for i in range(4):
        rgb = np.random.default_rng(i).integers(0, 256, (30, 30, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / "dogs" / f"{i}.jpg", quality=90)
    dm = MediaDataModule(image_dir=str(tmp_path), image_size=16, batch_size=4)
    assert dm.class_names == ["cats", "dogs"] and dm.num_classes == 2 and dm.in_channels == 3
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[1:] == (3, 16, 16) and batch["image"].min() >= -1 and batch["image"].max() <= 1
    gray = MediaDataModule(image_dir=str(tmp_path / "cats"), image_size=16, channels=None)
    assert gray.num_classes == 0 and gray.in_channels == 3  # one RGB file: everything becomes RGB


def test_flat_gray_folder_is_unlabelled_single_channel(tmp_path):
    for i in range(5):
        write_png(tmp_path / f"{i}.png", (16, 16), "L", i)
    dm = MediaDataModule(image_dir=str(tmp_path), image_size=16)
    assert (dm.in_channels, dm.num_classes) == (1, 0)
    dm.setup()
    assert next(iter(dm.train_dataloader()))["label"].eq(-1).all()


def test_mnist_style_npz_keeps_its_split(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), y_train=np.arange(30) % 3,
             x_test=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), y_test=np.arange(10) % 3)  # fmt: skip
    dm = MediaDataModule(npz_path=str(path), image_size=16)
    assert (dm.in_channels, dm.num_classes) == (1, 3)
    assert {k: len(v) for k, v in dm.split_indices.items()} == {"train": 30, "val": 5, "test": 5}
    assert dm.source.pixels.shape == (40, 16, 16, 1)


def test_medmnist_style_npz_keeps_its_official_splits(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{split}_images": rng.integers(0, 256, (n, 16, 16), dtype=np.uint8) for split, n in (("train", 20), ("val", 6), ("test", 8))}
    arrays.update({f"{split}_labels": (np.arange(n) % 2).reshape(n, 1) for split, n in (("train", 20), ("val", 6), ("test", 8))})
    np.savez(tmp_path / "med.npz", **arrays)
    dm = MediaDataModule(npz_path=str(tmp_path / "med.npz"), image_size=16)
    assert {k: len(v) for k, v in dm.split_indices.items()} == {"train": 20, "val": 6, "test": 8}
    assert np.array_equal(dm.source.pixels[dm.split_indices["val"], ..., 0], arrays["val_images"])
    assert dm.num_classes == 2


def test_16_bit_png_is_scaled_by_bit_depth_not_clipped(tmp_path):
    """PIL's convert("L") clips 16-bit values to 255 (a mid-grey gradient read as white): the bit-depth
    rule of pipelines/images.py reads value / 65535, the same picture as 8 bits within one level."""
    gradient = np.tile(np.linspace(0, 65535, 32), (32, 1)).astype(np.uint16)
    folder = tmp_path / "sixteen"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.roll(gradient, 8 * i, axis=1)).save(folder / f"g{i}.png")
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(folder / "black.png")
    dm = MediaDataModule(image_dir=str(folder), image_size=32)
    pixels = dict(zip([Path(n).name for n in dm.source.names], dm.source.pixels))
    assert dm.in_channels == 1 and abs(float(pixels["g0.png"].mean()) - 127.5) < 1
    assert pixels["black.png"].max() == 0  # a constant 16-bit image is a valid (black) picture, not clipped to white
    eight = np.rint(gradient / 257.0).astype(np.uint8)
    assert np.abs(pixels["g0.png"][..., 0].astype(int) - eight).max() <= 1
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 9).save(folder / "colour.png")
    rgb = MediaDataModule(image_dir=str(folder), image_size=32)
    assert rgb.in_channels == 3
    g0 = dict(zip([Path(n).name for n in rgb.source.names], rgb.source.pixels))["g0.png"]
    assert np.array_equal(g0[..., 0], g0[..., 2]) and abs(float(g0.mean()) - 127.5) < 1


def test_real_mnist_npz():
    path = shared_file("media/mnist.npz")
    dm = MediaDataModule(npz_path=str(path), image_size=28, max_train_images=500, max_eval_images=100)
    assert (dm.in_channels, dm.num_classes, dm.image_size) == (1, 10, 28)
    assert len(dm.split_indices["train"]) == 500 and len(dm.source.pixels) == 70000


# ----- bad input ------------------------------------------------------------------------------------
def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no image files .* found"):
        MediaDataModule(image_dir=str(tmp_path)).in_channels


def test_unreadable_image_is_named(tmp_path):
    write_png(tmp_path / "good.png", (16, 16))
    (tmp_path / "broken.png").write_bytes(b"this is not a png at all")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        MediaDataModule(image_dir=str(tmp_path)).in_channels


def test_truncated_image_is_named(tmp_path):
    write_png(tmp_path / "good.png", (16, 16))
    full = write_png(tmp_path / "cut.png", (64, 64), seed=5).read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=r"cut\.png \(unreadable or truncated\)"):
        MediaDataModule(image_dir=str(tmp_path), image_size=16).in_channels


def test_mixed_channels_with_a_fixed_count_name_the_file(tmp_path):
    write_png(tmp_path / "gray.png", (16, 16), "L")
    write_png(tmp_path / "colour.png", (16, 16), "RGB")
    with pytest.raises(ValueError, match=r"colour\.png has 3 channel\(s\) but channels=1"):
        MediaDataModule(image_dir=str(tmp_path), channels=1).in_channels


def test_npz_without_an_image_array(tmp_path):
    path = tmp_path / "table.npz"
    np.savez(path, labels=np.arange(10), weights=np.ones(3))
    with pytest.raises(ValueError, match=r"table\.npz: no image array found"):
        MediaDataModule(npz_path=str(path)).in_channels
    with pytest.raises(ValueError, match=r"no array 'pixels'"):
        MediaDataModule(npz_path=str(path), npz_key="pixels").in_channels


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


def test_unknown_augmentation_is_an_error():
    with pytest.raises(ValueError, match="no transform 'Sparkle'"):
        shapes_module(augment=[{"Sparkle": {"p": 1.0}}])
    with pytest.raises(ValueError, match="invalid arguments for HorizontalFlip"):  # a misspelt argument is not ignored
        shapes_module(augment=[{"HorizontalFlip": {"probability": 0.5}}])


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


# ----- export and serving -------------------------------------------------------------------------
CLASSES = ["circle", "square", "triangle"]
GEOMETRY = {"in_channels": 3, "image_size": 16, "num_classes": 3, "class_names": CLASSES}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_bundle_runs_the_numpy_ddim_loop_like_monai(tmp_path, prediction_type):
    from domains.media.serving import DiffusionGenerationAdapter, SeedGenerationAdapter, ddim_sample

    from pipelines.bundle_runtime import Bundle
    from pipelines.domain_registry import get_domain
    from pipelines.export import export_checkpoint

    torch.manual_seed(0)
    model = Diffusion(**{**TINY_DIFFUSION, "prediction_type": prediction_type}, **GEOMETRY).eval()
    with torch.no_grad():  # untrained, MONAI's output convolution is zero: give the EMA UNet non-trivial weights
        for p in model.ema_unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bundle = Bundle(export_checkpoint(get_domain("media"), save_checkpoint(model, tmp_path / "d.ckpt"), "onnx", tmp_path / "bundle"))
    meta = bundle.metadata["domain_metadata"]
    assert bundle.metadata["parity"]["max_abs_diff"] <= 1e-4 and [s["name"] for s in bundle.metadata["inputs"]] == ["noisy", "timestep", "labels"]
    schedule = meta["scheduler"]
    assert schedule["prediction_type"] == prediction_type
    assert schedule["timesteps"] == [39, 26, 13, 0] and len(schedule["alphas_cumprod"]) == 40 and meta["class_names"] == CLASSES

    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        want = model.sample(noise, labels, steps=4).clamp(-1, 1).numpy()
    got = ddim_sample(lambda inputs: bundle.run(**inputs)["noise"], noise.numpy(), schedule, labels.numpy())
    assert np.abs(want).max() > 0.1
    # the cosine schedule's first step divides by sqrt(alphas_cumprod[-1]) ~ 1e-4 (epsilon prediction), which
    # magnifies float32 differences between onnxruntime and torch to ~2e-4 (1/40 of an 8-bit grey level)
    np.testing.assert_allclose(got, want, atol=5e-4)
    # seeded generation of a diffusion bundle is its own form (a DDIM loop on the server), not the GAN's
    assert not SeedGenerationAdapter.serves(bundle.metadata) and DiffusionGenerationAdapter.serves(bundle.metadata)


@pytest.fixture(scope="module")
def gan_server(tmp_path_factory):
    """An (untrained, randomly initialised) conditional GAN exported to ONNX and served on a loopback port."""
    import signal

    from pipelines.domain_registry import get_domain
    from pipelines.export import export_checkpoint

    folder = tmp_path_factory.mktemp("media-serve")
    torch.manual_seed(0)
    model = GAN(**TINY_GAN, **GEOMETRY).eval()
    bundle = export_checkpoint(get_domain("media"), save_checkpoint(model, folder / "g.ckpt"), "onnx", folder / "bundle")
    server = start_server("media", bundle, folder / "server.log", "--max_batch_size", "8", "--batch_timeout", "0.02")
    yield server, model
    server.stop(signal.SIGTERM)


def test_gan_bundle_is_the_generator_in_zero_one(gan_server):
    server, model = gan_server
    from pipelines.bundle_runtime import Bundle

    bundle = Bundle(server.bundle)
    meta = bundle.metadata["domain_metadata"]
    assert meta["latent_dim"] == 16 and meta["value_range"] == [0.0, 1.0] and meta["class_names"] == CLASSES and meta["channels"] == 3
    assert bundle.metadata["parity"]["max_abs_diff"] <= 1e-4
    seeds, labels = [5, 6, 7], torch.tensor([2, 0, 1])
    want = ((model.generate(seeds, labels) + 1) / 2).numpy()  # torch-seeded noise, the model's own sampling
    from domains.media.model import seeded_noise

    got = bundle.run(noise=seeded_noise(seeds, (16,)).numpy(), labels=labels.numpy())["images"]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_seed_requests_over_http_give_deterministic_pngs(gan_server):
    from domains.media.serving import seeded_noise_numpy
    from pipelines.bundle_runtime import Bundle
    server, _ = gan_server
    status, first = request(server.url + "/predict", {"seed": 0, "count": 4})
    assert status == 200, first
    images = decode_pngs(first)
    assert images.shape == (4, 16, 16, 3)
    assert request(server.url + "/predict", {"seed": 0, "count": 4}) == (200, first)  # same seed, same bytes
    status, third = request(server.url + "/predict", {"seed": 2})  # image i depends on seed + i only
    assert status == 200 and np.array_equal(decode_pngs(third)[0], images[2])
    assert not np.array_equal(decode_pngs(request(server.url + "/predict", {"seed": 1, "count": 4})[1]), images)
    # the pixels are the bundle's output for the documented numpy noise, labels cycling through the classes
    out = Bundle(server.bundle).run(noise=seeded_noise_numpy([0, 1, 2, 3], [16]), labels=np.array([0, 1, 2, 0]))["images"]
    np.testing.assert_array_equal(images, np.rint(out * 255).astype(np.uint8).transpose(0, 2, 3, 1))
    status, squares = request(server.url + "/predict", {"seed": 0, "count": 4, "label": "square"})
    by_index = request(server.url + "/predict", {"seed": 0, "count": 4, "label": 1})[1]
    assert status == 200 and squares == by_index and np.array_equal(decode_pngs(squares)[1], images[1])
    assert not np.array_equal(decode_pngs(squares)[0], images[0])  # same noise, another class


@pytest.mark.parametrize(
    "body, field",
    [
        ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": "0"}, "seed"), ({"seed": 0, "count": 0}, "count"),
        ({"seed": 0, "count": 65}, "count"), ({"seed": 0, "label": "hexagon"}, "label"), ({"seed": 0, "label": 3}, "label"),
        ({"seed": 0, "steps": 2}, "steps"),
    ],
)  # fmt: skip
def test_bad_seed_requests_get_422_naming_the_field(gan_server, body, field):
    server, _ = gan_server
    status, answer = request(server.url + "/predict", body)
    assert status == 422 and answer["detail"].startswith(f"{field}: "), (body, status, answer)
