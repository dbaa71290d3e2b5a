"""``classifier_hue_turn`` (the GAN's auxiliary classifier sees hue-turned images, its realness head the images as they are)
and ``lr_schedule``.
Real Trainer, real discriminator, tiny shapes set."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from domains.media.model import GAN
from pipelines.errors import InputError
from tests.helpers import QUIET, TINY_GAN, linked, shapes_module


def discriminator_inputs_of_one_batch(tmp_path, mode: str) -> list[torch.Tensor]:
    """The image batches of every discriminator call during one training batch of a tiny conditional GAN."""
    pl.seed_everything(0, verbose=False)
    dm = shapes_module()
    model = GAN(**TINY_GAN, classifier_hue_turn=mode, **linked(dm))
    inputs: list[torch.Tensor] = []
    model.discriminator.register_forward_hook(lambda module, args, output: inputs.append(args[0].detach().clone()))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=False, **QUIET)
    trainer.fit(model, datamodule=dm)
    return inputs


def hue_turned(turned: torch.Tensor, original: torch.Tensor) -> bool:
    """``turned`` is ``original`` with its colours turned about the grey axis: same brightness per pixel, other colours."""
    return torch.allclose(turned.mean(1), original.mean(1), atol=1e-5) and not torch.allclose(turned, original, atol=1e-2)


def test_classifier_hue_turn_feeds_the_classifier_hue_turned_images_and_the_realness_head_the_images_as_they_are(tmp_path):
    off = discriminator_inputs_of_one_batch(tmp_path / "off", "off")
    assert len(off) == 3  # real, generated (discriminator step), generated (generator step)
    real = discriminator_inputs_of_one_batch(tmp_path / "real", "real")
    assert len(real) == 4 and hue_turned(real[2], real[0])  # the class cross-entropy on real images: turned copies
    assert not hue_turned(real[1], real[0])
    both = discriminator_inputs_of_one_batch(tmp_path / "both", "real_and_generated")
    assert len(both) == 5 and hue_turned(both[2], both[0]) and hue_turned(both[4], both[3])  # the generator's too


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"classifier_hue_turn": "fake"}, r"classifier_hue_turn 'fake': .* must be one of off, real, real_and_generated"),
        ({"classifier_hue_turn": "real", "class_loss_weight": 0.0}, r"classifier_hue_turn 'real' .* class_loss_weight > 0"),
        ({"classifier_hue_turn": "real", "conditional": False}, r"classifier_hue_turn 'real' .* conditional true"),
        ({"classifier_hue_turn": "real", "in_channels": 1}, r"classifier_hue_turn 'real' .* RGB images \(3 channels\), the data has 1"),
    ],
)
def test_classifier_hue_turn_refuses_what_it_cannot_do(options, expected):
    with pytest.raises(InputError, match=r"--model.init_args." + expected):
        GAN(**{**TINY_GAN, "image_size": 16, "num_classes": 3, "in_channels": 3, **options})


def test_lr_schedule_linear_lowers_both_learning_rates_each_epoch_and_refuses_other_values(tmp_path):
    class LearningRates(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[list[float]] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.seen.append([optimizer.param_groups[0]["lr"] for optimizer in trainer.optimizers])

    dm = shapes_module()
    model = GAN(**TINY_GAN, lr_schedule="linear", **linked(dm))
    rates = LearningRates()
    trainer = pl.Trainer(max_epochs=4, limit_train_batches=1, limit_val_batches=0, callbacks=[rates], default_root_dir=tmp_path, enable_checkpointing=False, **QUIET)
    trainer.fit(model, datamodule=dm)
    assert [pair for pair in rates.seen if pair[0] == pair[1]] == rates.seen  # generator and discriminator alike
    assert [pair[0] for pair in rates.seen] == pytest.approx([8e-4, 6e-4, 4e-4, 2e-4])
    with pytest.raises(InputError, match=r"--model.init_args.lr_schedule 'cosine': .* one of constant, linear"):
        GAN(**TINY_GAN, lr_schedule="cosine", image_size=16, num_classes=3, in_channels=3)
