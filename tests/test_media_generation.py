"""Media generation options that must hold: classifier-free guidance, DiffAugment, sampler/steps/guidance at
predict and in serving, ``max_time`` over the whole fit. Real Trainers, real runner, real bundles, tiny sizes."""

from __future__ import annotations

import json
import time

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from domains.media.data import MediaDataModule
from domains.media.diffaugment import DiffAugment, parse_policy
from domains.media.metrics import features_of, reference_statistics
from domains.media.model import GAN, Diffusion
from domains.media.quality import offline_scores
from pipelines.errors import InputError
from tests.bad_inputs import BadInput, check_refused, params
from tests.conftest import only_run, run_pipeline
from tests.helpers import QUIET, SERVED_DIFFUSION, TINY_DIFFUSION, TINY_GAN, linked, save_checkpoint, shapes_module

GUIDED = {**TINY_DIFFUSION, "cond_drop_prob": 0.2}


# ----- DiffAugment --------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "hue"])
def test_diffaugment_policy_changes_images_and_passes_gradients(policy):
    torch.manual_seed(0)
    images = (torch.rand(8, 3, 16, 16) * 2 - 1).requires_grad_(True)
    out = DiffAugment(parse_policy(policy))(images)
    assert out.shape == images.shape and not torch.allclose(out, images)
    out.square().sum().backward()  # differentiable: the generator learns through it
    assert images.grad is not None and images.grad.abs().sum() > 0
    if policy == "cutout":  # a square of half the side is zeroed in every image
        assert ((out == 0).flatten(1).sum(1) >= 3 * 4 * 4).all()
    if policy == "translation":  # shifted content: every image is its input moved by at most 2 pixels (1/8 of 16)
        moved = [min(float((out[i].detach() - torch.roll(images[i].detach(), (dy, dx), (1, 2)))[:, 2:-2, 2:-2].abs().max()) for dy in range(-2, 3) for dx in range(-2, 3)) for i in range(8)]
        assert max(moved) == 0


def test_hue_policy_turns_colours_about_the_grey_axis_and_keeps_brightness():
    """``hue``: grey pixels stay, the channel mean (brightness) and each colour's distance from grey stay, the hue moves."""
    torch.manual_seed(0)
    images = torch.rand(16, 3, 8, 8) * 2 - 1
    out = DiffAugment(parse_policy("hue"))(images)
    assert torch.allclose(out.mean(1), images.mean(1), atol=1e-5)
    chroma = lambda x: (x - x.mean(1, keepdim=True)).norm(dim=1)  # noqa: E731
    assert torch.allclose(chroma(out), chroma(images), atol=1e-5)
    assert (out - images).abs().amax((1, 2, 3)).min() > 1e-3  # every image's colours moved
    grey = torch.rand(4, 1, 8, 8).expand(4, 3, 8, 8) * 2 - 1
    assert torch.allclose(DiffAugment(parse_policy("hue"))(grey), grey, atol=1e-5)


def test_hue_policy_leaves_gray_images_and_a_misspelt_name_is_refused():
    gray = torch.rand(4, 1, 8, 8) * 2 - 1
    assert torch.equal(DiffAugment(parse_policy("hue"))(gray), gray)  # no hue to turn
    with pytest.raises(ValueError, match="gray or RGB images, got 4 channels"):
        DiffAugment(parse_policy("hue"))(torch.zeros(1, 4, 8, 8))
    with pytest.raises(InputError, match=r"unknown DiffAugment policy 'hues' \(did you mean 'hue'\?\)"):
        parse_policy("translation,hues")


def test_diffaugment_probability_augments_that_share_of_images_and_refuses_values_outside_0_1():
    torch.manual_seed(0)
    images = torch.rand(400, 3, 4, 4) * 2 - 1
    out = DiffAugment(parse_policy("hue"), probability=0.5)(images)
    changed = (out - images).abs().amax((1, 2, 3)) > 1e-4
    assert 150 < int(changed.sum()) < 250  # about half, each image drawn on its own; the others exactly as they were
    assert torch.equal(out[~changed], images[~changed])
    for bad in (0, 1.5, -0.1):
        with pytest.raises(InputError, match=rf"--model.init_args.diffaugment_probability {bad}: .* must be in \(0, 1\]"):
            GAN(**TINY_GAN, diffaugment="hue", diffaugment_probability=bad, image_size=16, in_channels=3)


def test_diffaugment_policy_names():
    assert parse_policy("color, translation,cutout") == ("color", "translation", "cutout")
    assert parse_policy(None) == parse_policy("none") == ()
    with pytest.raises(InputError, match=r"unknown DiffAugment policy 'colour' \(did you mean 'color'\?\)"):
        parse_policy("colour,cutout")
    with pytest.raises(InputError, match="each policy once"):
        parse_policy("color,color")


def test_gan_with_diffaugment_shows_the_discriminator_augmented_reals_and_fakes(tmp_path):
    """Every discriminator input (real and fake, both steps) is augmented: cutout leaves a zero square in each."""
    dm = shapes_module()
    model = GAN(**TINY_GAN, diffaugment="translation,cutout", **linked(dm))
    seen: list[torch.Tensor] = []
    model.discriminator.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, default_root_dir=tmp_path, **QUIET)
    trainer.fit(model, datamodule=dm)
    assert len(seen) == 6  # per batch: real and fake for the discriminator step, fake for the generator step
    assert all(((x == 0).all(1).flatten(1).sum(1) >= 16).all() for x in seen)  # an 8x8 cutout (clipped at borders: >= 4x4)
    plain = GAN(**TINY_GAN, **linked(dm))
    real = next(iter(dm.train_dataloader()))["image"]
    assert torch.equal(plain.augment(real), real)  # off by default


REFUSED = [
    BadInput("diffaugment_typo", ("--model.init_args.diffaugment=color,translaton",), ("--model.init_args.diffaugment", "'translaton'", "did you mean 'translation'")),
    BadInput("diffaugment_probability_above_1", ("--model.init_args.diffaugment=hue", "--model.init_args.diffaugment_probability=2"), ("--model.init_args.diffaugment_probability", "(0, 1]")),
    BadInput("guidance_without_null_class", ("--model=domains.media.model.Diffusion", "--model.init_args.guidance_scale=3"), ("guidance_scale 3", "cond_drop_prob")),
    BadInput("cond_drop_prob_out_of_range", ("--model=domains.media.model.Diffusion", "--model.init_args.cond_drop_prob=1.5"), ("cond_drop_prob", "[0, 1)")),
    BadInput("classifier_hue_turn_unknown", ("--model.init_args.classifier_hue_turn=fake",), ("--model.init_args.classifier_hue_turn", "'fake'", "off, real, real_and_generated")),
    BadInput("negative_generate_guidance", ("--data.generate_guidance_scale=-1",), ("--data.generate_guidance_scale", "a number in 0..20")),
    # an optional float: jsonargparse's Union refusal ("Does not validate against any of the Union subtypes") was shown as it was
    BadInput("nan_generate_guidance", ("--data.generate_guidance_scale=nan",), ("--data.generate_guidance_scale nan: expected a finite number",)),
]


@pytest.mark.parametrize("case", params(REFUSED))
def test_bad_generation_options_are_refused_before_anything_is_written(case, tmp_path, capsys):
    check_refused("media", case, tmp_path, capsys)


# ----- classifier-free guidance ---------------------------------------------------------------------------
def test_condition_dropout_adds_a_null_class_and_drops_labels_at_its_rate():
    dm = shapes_module()
    model = Diffusion(**GUIDED, **linked(dm))
    assert model.null_label == 3 and model.unet.num_class_embeds == 4  # three shapes + the null class
    assert Diffusion(**TINY_DIFFUSION, **linked(dm)).unet.num_class_embeds == 3  # without dropout: as before
    torch.manual_seed(0)
    labels = torch.arange(20000) % 3
    dropped = model._training_labels(labels)
    assert abs(float((dropped == 3).float().mean()) - 0.2) < 0.015
    assert torch.equal(dropped[dropped != 3], labels[dropped != 3])  # the others keep their class


def test_guidance_combines_the_conditional_and_null_predictions():
    """``w = 1`` is the conditional model, ``w = 0`` the null class's, ``w`` in general ``uncond + w (cond - uncond)`` per step."""
    from domains.media.diffusion_networks import GuidedDenoiser

    torch.manual_seed(0)
    model = Diffusion(**{**GUIDED, "in_channels": 3, "image_size": 16, "num_classes": 3}).eval()
    with torch.no_grad():
        for p in model.ema_unet.parameters():  # MONAI's output convolution starts at zero: make the outputs differ
            p.add_(0.05 * torch.randn_like(p))
        x, t, labels = torch.randn(4, 3, 16, 16), torch.tensor([20.0]), torch.tensor([0, 1, 2, 0])
        cond = model.ema_unet(x, t, class_labels=labels)
        uncond = model.ema_unet(x, t, class_labels=torch.full_like(labels, 3))
        torch.testing.assert_close(GuidedDenoiser(model.ema_unet, labels, 3, 3.0)(x, t), uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
        noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        plain, one = model.sample(noise, labels), model.sample(noise, labels, guidance_scale=1.0)
        null = model.sample(noise, torch.full_like(labels, 3))
        torch.testing.assert_close(plain, one)
        torch.testing.assert_close(model.sample(noise, labels, guidance_scale=0.0), null)
        assert (model.sample(noise, labels, guidance_scale=3.0) - plain).abs().max() > 1e-3


def halves(tmp_path):
    from tests.test_media_training import halves_npz

    return MediaDataModule(npz_path=str(halves_npz(tmp_path / "halves.npz")), image_size=16, batch_size=32)


def test_guided_sampling_draws_the_requested_class(tmp_path):
    """A tiny guided model (64 batches) on the two-class halves set: the run's extractor recognises the requested class
    in guided samples (w = 3) well above the majority share (0.5); the null class's samples (w = 0) ignore the label, so
    the label reaches the UNet only through the class embedding that guidance contrasts with the null one. One run
    measured 0.52 / 0.875 / 0.86 at w = 0 / 1 / 3 (on 64 alternating labels, before the test split was used) (0.47 / 0.66 / 0.73 after 6 epochs): no claim here that w = 3 beats w = 1."""
    pl.seed_everything(0, verbose=False)
    dm = halves(tmp_path)
    settings = {**GUIDED, "cond_drop_prob": 0.1, "attention_levels": [False, False], "num_train_timesteps": 100, "extractor_steps": 10,
                "lr": 2e-3, "ema_decay": 0.9, "prediction_type": "v_prediction"}  # fmt: skip
    model = Diffusion(**settings, **linked(dm))
    trainer = pl.Trainer(max_epochs=8, limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=False, **QUIET)
    trainer.fit(model, datamodule=dm)
    model.eval()
    real, labels = dm.split_tensors("test")
    reference = reference_statistics(features_of(model.extractor, real))
    accuracy, balanced = {}, {}
    for scale in (0.0, 1.0, 3.0):
        images = model.generate(list(range(len(labels))), labels, steps=10, guidance_scale=scale)
        with torch.no_grad():  # what test/class_acc_cnn and test/class_balanced_acc_cnn log
            scores = offline_scores(model.extractor, "test", reference, images, labels, 16, model.condition_classes)
        accuracy[scale], balanced[scale] = scores["test/class_acc_cnn"], scores["test/class_balanced_acc_cnn"]
    assert scores["test/real_class_acc_cnn"] >= 0.95 and scores["test/real_class_balanced_acc_cnn"] >= 0.95  # the ceiling: real images
    assert accuracy[3.0] >= 0.7 and balanced[3.0] >= 0.7, (accuracy, balanced)
    assert abs(balanced[0.0] - 0.5) <= 0.15, f"the null class ignores the label, so it should not match it: {balanced}"


# ----- predict: sampler, steps and guidance are honoured, and recorded ---------------------------------------
GUIDED_MODEL = ["--model", "domains.media.model.Diffusion", *[f"--model.init_args.{k}={json.dumps(v)}" for k, v in GUIDED.items()]]
GUIDED_DATA = ["--data.synthetic_samples=60", "--data.image_size=16", "--data.batch_size=8", "--data.num_generate=3", "--trainer.logger=false"]


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory):
    """A tiny guided diffusion run (num_train_timesteps 40, sampling_steps 4), trained once for this module's predicts."""
    runs_dir = tmp_path_factory.mktemp("guided") / "runs"
    run_pipeline("media", *GUIDED_MODEL, *GUIDED_DATA, "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.limit_train_batches=2",
                 "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--runs_dir", str(runs_dir))  # fmt: skip
    return runs_dir, only_run(runs_dir, "media")


def test_predict_honours_sampler_steps_and_guidance_and_refuses_a_dropped_model_option(guided_run, tmp_path, capsys):
    import pandas as pd

    model, data = GUIDED_MODEL, GUIDED_DATA
    runs_dir, run = guided_run

    def predict(name: str, *options: str) -> tuple[list[bytes], pd.DataFrame]:
        folder = tmp_path / name
        run_pipeline("media", "predict", *data, f"--data.generate_dir={folder}", f"--output={name}.csv", *options,
                     "--runs_dir", str(runs_dir), "--ckpt_path", "best", "--run_id", run.name)  # fmt: skip
        return [p.read_bytes() for p in sorted(folder.glob("*.png"))], pd.read_csv(run / f"{name}.csv")

    base, rows = predict("base")
    assert len(base) == 3 and set(rows["steps"]) == {4} and set(rows["sampler"]) == {"ddim"} and set(rows["guidance_scale"]) == {1.0}
    for name, options, column, value in [
        ("steps1", ["--data.generate_steps=1"], "steps", 1),
        ("ddpm", ["--data.generate_sampler=ddpm"], "sampler", "ddpm"),
        ("null", ["--data.generate_guidance_scale=0"], "guidance_scale", 0.0),
        ("guided", ["--data.generate_guidance_scale=4"], "guidance_scale", 4.0),  # last: config-predict.yaml is the latest predict's
    ]:
        images, rows = predict(name, *options)
        assert set(rows[column]) == {value}, (name, rows)
        assert len(images) == 3 and all(a != b for a, b in zip(images, base)), f"{options} gave the same images as the default"
    recorded = sorted(run.glob("config-predict*.yaml"))
    assert recorded and any(yaml.safe_load(p.read_text())["data"]["generate_guidance_scale"] == 4.0 for p in recorded)

    # a model option at predict would be replaced by the checkpoint's: refused, not ignored
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        run_pipeline("media", "predict", *data, "--model=domains.media.model.Diffusion", "--model.init_args.guidance_scale=3", "--runs_dir", str(runs_dir),
                     "--ckpt_path", "best", "--run_id", run.name)  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert refused.value.code == 2 and "--model.init_args.guidance_scale 3" in err and "guidance_scale: 1.0 there" in err, err
    run_pipeline("media", "predict", *model, *data, f"--data.generate_dir={tmp_path / 'same'}", "--output=same.csv", "--runs_dir", str(runs_dir),
                 "--ckpt_path", "best", "--run_id", run.name)  # the training options repeated, equal to the checkpoint's: fine  # fmt: skip


def test_predict_refuses_steps_the_model_cannot_take_before_anything_is_written(guided_run, tmp_path, capsys):
    """More DDIM steps than the model's num_train_timesteps crashed mid-predict (exit 1); steps beside the ddpm sampler
    were ignored (exit 0, all 40 steps run). Both are refused with exit 2 before the run folder changes."""
    import hashlib

    runs_dir, run = guided_run

    def digests() -> dict[str, str]:
        return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()}

    before = digests()
    for options, expected in [
        (["--data.generate_steps=41"], ["--data.generate_steps 41: this model was trained with num_train_timesteps 40", "give --data.generate_steps 40 or fewer"]),
        (["--data.generate_sampler=ddpm", "--data.generate_steps=2"], ["--data.generate_steps 2 with --data.generate_sampler ddpm", "--data.generate_sampler ddim"]),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as refused:
            run_pipeline("media", "predict", *GUIDED_DATA, f"--data.generate_dir={tmp_path / 'out'}", *options, "--runs_dir", str(runs_dir), "--ckpt_path", "best",
                         "--run_id", run.name)  # fmt: skip
        err = " ".join(capsys.readouterr().err.split())
        assert refused.value.code == 2 and "Traceback" not in err and all(e in err for e in expected), (options, err)
        assert digests() == before and not (tmp_path / "out").exists(), f"{options}: a refused predict wrote into {run}"


def test_gan_predict_refuses_diffusion_only_options_before_anything_is_written(runs_dir, tmp_path, capsys):
    """A GAN ignored --data.generate_steps (exit 0); a sampler or guidance scale stopped it mid-predict. Each is refused
    with exit 2, naming it, before the run folder changes; a predict without them (their defaults) is not refused."""
    import hashlib

    common = ["--data.synthetic_samples=60", "--data.image_size=16", "--data.batch_size=8", "--data.num_generate=2", "--trainer.logger=false",
              *[f"--model.init_args.{k}={v}" for k, v in TINY_GAN.items()]]  # fmt: skip
    run_pipeline("media", *common, "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
                 "--trainer.limit_test_batches=1", "--runs_dir", str(runs_dir))  # fmt: skip
    run = only_run(runs_dir, "media")
    predict = [*common, "--runs_dir", str(runs_dir), "--ckpt_path", "best", "--run_id", run.name]
    run_pipeline("media", "predict", *predict, f"--data.generate_dir={tmp_path / 'plain'}")  # the defaults: generated, not refused
    assert len(list((tmp_path / "plain").glob("*.png"))) == 2

    def digests() -> dict[str, str]:
        return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()}

    before = digests()
    for option in ("--data.generate_steps=3", "--data.generate_sampler=ddim", "--data.generate_guidance_scale=2"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as refused:
            run_pipeline("media", "predict", *predict, option, f"--data.generate_dir={tmp_path / 'out'}")
        err = " ".join(capsys.readouterr().err.split())
        assert refused.value.code == 2 and "Traceback" not in err, (option, err)
        assert option.replace("=", " ") + ":" in err and "applies to diffusion models only" in err and "GAN" in err, (option, err)
        assert digests() == before and not (tmp_path / "out").exists(), f"{option}: a refused predict wrote into {run}"


# ----- the bundle's own runtime and the server ----------------------------------------------------------
def test_guided_bundle_samples_like_the_checkpoint_and_serves_guidance(tmp_path):
    from domains.media.serving import DiffusionGenerationAdapter
    from pipelines.bundle_runtime import Bundle
    from pipelines.domain_registry import get_domain
    from pipelines.export import export_checkpoint
    from fastapi import HTTPException

    torch.manual_seed(0)
    model = Diffusion(**{**SERVED_DIFFUSION, "cond_drop_prob": 0.1, "guidance_scale": 2.0}).eval()
    with torch.no_grad():
        for p in model.ema_unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bundle = Bundle(export_checkpoint(get_domain("media"), save_checkpoint(model, tmp_path / "d.ckpt"), "onnx", tmp_path / "bundle"))
    assert bundle.metadata["domain_metadata"]["scheduler"]["guidance"] == {"null_label": 2, "guidance_scale": 2.0}
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1])
    by_scale = {}
    for scale in (None, 0.0, 1.0, 4.0):
        with torch.no_grad():
            want = ((model.sample(noise, labels, steps=4, guidance_scale=scale).clamp(-1, 1) + 1) / 2).numpy()
        got = bundle.generate(noise=noise.numpy(), labels=labels.numpy(), steps=4, guidance_scale=scale)
        np.testing.assert_allclose(got, want, atol=1e-3)
        by_scale[scale] = got
    np.testing.assert_array_equal(by_scale[None], bundle.generate(noise=noise.numpy(), labels=labels.numpy(), steps=4, guidance_scale=2.0))
    assert all(np.abs(by_scale[a] - by_scale[b]).max() > 1e-3 for a, b in [(0.0, 1.0), (1.0, 4.0), (None, 1.0)])

    adapter = DiffusionGenerationAdapter(bundle.metadata)
    answer = adapter.encode(adapter.infer(adapter.decode({"seed": 0, "count": 2, "guidance_scale": 4}), bundle.run))
    assert answer["guidance_scale"] == 4.0 and answer["steps"] == 4
    assert adapter.encode(adapter.infer(adapter.decode({"seed": 0, "count": 2}), bundle.run))["guidance_scale"] == 2.0
    assert answer["images"] != adapter.encode(adapter.infer(adapter.decode({"seed": 0, "count": 2, "guidance_scale": 1}), bundle.run))["images"]
    for body, words in [({"seed": 0, "guidance_scale": -1}, "guidance_scale: expected a number in 0..20"), ({"seed": 0, "guidance_scale": "2"}, "guidance_scale"),
                        ({"seed": 0, "count": 32, "steps": 40, "guidance_scale": 3}, "x 2 (guidance)")]:  # fmt: skip
        with pytest.raises(HTTPException) as refused:
            adapter.decode(body)
        assert refused.value.status_code == 422 and words in str(refused.value.detail), (body, refused.value.detail)

    plain = Diffusion(**SERVED_DIFFUSION).eval()
    plain_bundle = Bundle(export_checkpoint(get_domain("media"), save_checkpoint(plain, tmp_path / "p.ckpt"), "onnx", tmp_path / "plain"))
    with pytest.raises(HTTPException, match="without a null class"):
        DiffusionGenerationAdapter(plain_bundle.metadata).decode({"seed": 0, "guidance_scale": 2})
    with pytest.raises(ValueError, match="without a null class"):
        plain_bundle.generate(count=1, guidance_scale=2.0)


# ----- max_time -------------------------------------------------------------------------------------------------
def test_max_time_covers_the_extractor_training(tmp_path):
    """The extractor (trained in on_fit_start, before Lightning's timer starts) counts against max_time: with a
    1-second budget that the extractor alone exceeds, no training batch runs (before: several did)."""

    class Clock(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.fit_start = time.monotonic()

        def on_train_start(self, trainer, pl_module):
            self.train_start = time.monotonic()

    dm = shapes_module()
    model = GAN(**{**TINY_GAN, "extractor_steps": 150}, **linked(dm), extractor_cache=str(tmp_path / "cache"))
    clock = Clock()
    trainer = pl.Trainer(max_time={"seconds": 1}, max_epochs=50, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[clock], **QUIET)
    trainer.fit(model, datamodule=dm)
    assert clock.train_start - clock.fit_start > 1, "the extractor trained faster than the budget: this test shows nothing"
    assert trainer.global_step == 0, f"{trainer.global_step} steps after the budget was spent"
    # the same budget with the extractor cached: training runs and is stopped by the timer
    again = GAN(**{**TINY_GAN, "extractor_steps": 150}, **linked(dm), extractor_cache=str(tmp_path / "cache"))
    trainer = pl.Trainer(max_time={"seconds": 1}, max_epochs=500, limit_val_batches=0, default_root_dir=tmp_path, **QUIET)
    started = time.monotonic()
    trainer.fit(again, datamodule=dm)
    assert trainer.global_step > 0 and trainer.current_epoch < 499 and time.monotonic() - started < 20
