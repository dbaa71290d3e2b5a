"""``twin_classifier`` (TAC-GAN): a second classifier head trained on generated images, whose cross-entropy the
generator maximises. Real Trainer, real discriminator and checkpoints, tiny shapes set."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from domains.media.model import GAN
from pipelines.errors import InputError
from tests.helpers import QUIET, TINY_GAN, linked, shapes_module


def trained(tmp_path, batches: int, **options) -> tuple[GAN, list[tuple[torch.Tensor, torch.Tensor, tuple]], dict]:
    """A tiny conditional GAN after ``batches`` training batches, the (images, labels, outputs) of every discriminator
    call of its last batch, and the losses it logged for that batch."""
    pl.seed_everything(0, verbose=False)
    dm = shapes_module()
    model = GAN(**TINY_GAN, **options, **linked(dm))
    calls: list[tuple[torch.Tensor, torch.Tensor, tuple]] = []

    def record(module, args, output) -> None:
        calls.append((args[0].detach().clone(), args[1].clone(), tuple(o.detach().clone() if o is not None else None for o in output)))

    class LastBatchOnly(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            calls.clear()

    model.discriminator.register_forward_hook(record)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=batches, limit_val_batches=0, callbacks=[LastBatchOnly()],
                         default_root_dir=tmp_path, enable_checkpointing=False, **QUIET)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return model, calls, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_twin_head_learns_generated_classes_and_the_generator_maximises_its_cross_entropy(tmp_path):
    plain, plain_calls, plain_logged = trained(tmp_path / "ac", 1)
    assert plain.discriminator.twin_classifier is None and all(out[2] is None for _, _, out in plain_calls)
    assert "train/twin_class_loss" not in plain_logged
    model, calls, logged = trained(tmp_path / "tac", 1, twin_classifier=True)
    weight = model.hparams.class_loss_weight
    assert len(calls) == 3  # real and generated (discriminator step), generated (generator step): no extra call
    (_, labels, (real_score, real_logits, _)), (_, _, (fake_score, _, twin_fake)), (_, _, (g_score, g_logits, g_twin)) = calls
    # discriminator step: hinge + the auxiliary classifier on real images + the twin on the (detached) generated ones
    twin_loss = F.cross_entropy(twin_fake, labels)
    d_loss = F.relu(1 - real_score).mean() + F.relu(1 + fake_score).mean() + weight * (F.cross_entropy(real_logits, labels) + twin_loss)
    assert logged["train/d_loss"] == pytest.approx(float(d_loss), rel=1e-5)
    assert logged["train/twin_class_loss"] == pytest.approx(float(twin_loss), rel=1e-5)
    # generator step: minus the twin's cross-entropy on its images with the requested labels
    g_loss = -g_score.mean() + weight * (F.cross_entropy(g_logits, labels) - F.cross_entropy(g_twin, labels))
    assert logged["train/g_loss"] == pytest.approx(float(g_loss), rel=1e-5)
    assert F.cross_entropy(g_twin, labels) > 0.05  # the term is not negligible
    # the twin head learns: it moves from its initial weights, and only with the option on
    pl.seed_everything(0, verbose=False)
    initial = GAN(**TINY_GAN, twin_classifier=True, **linked(shapes_module())).discriminator.twin_classifier.state_dict()
    learned, _, _ = trained(tmp_path / "tac8", 8, twin_classifier=True)
    after = learned.discriminator.twin_classifier.state_dict()
    assert set(after) == set(initial) and not torch.allclose(after["parametrizations.weight.original"], initial["parametrizations.weight.original"])


def gan_weights(model: GAN) -> dict[str, torch.Tensor]:
    """The generators' and discriminator's state (the feature extractor belongs to the data set and is replaced on load)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("extractor.")}


def test_a_checkpoint_saved_without_the_twin_loads_as_it_was_trained_and_one_with_it_keeps_it(tmp_path):
    plain, _, _ = trained(tmp_path / "ac", 1)
    old = tmp_path / "old.ckpt"
    plain.trainer.save_checkpoint(old)
    checkpoint = torch.load(old, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"].pop("twin_classifier")  # as saved before the option existed
    torch.save(checkpoint, old)
    loaded = GAN.load_from_checkpoint(old, map_location="cpu", weights_only=True)  # strict: no missing/unexpected keys
    assert loaded.discriminator.twin_classifier is None
    assert gan_weights(loaded).keys() == gan_weights(plain).keys()
    assert all(torch.equal(v, gan_weights(loaded)[k]) for k, v in gan_weights(plain).items())
    twin, _, _ = trained(tmp_path / "tac", 1, twin_classifier=True)
    new = tmp_path / "twin.ckpt"
    twin.trainer.save_checkpoint(new)
    reloaded = GAN.load_from_checkpoint(new, map_location="cpu", weights_only=True)
    assert reloaded.discriminator.twin_classifier is not None
    assert gan_weights(reloaded).keys() == gan_weights(twin).keys()
    assert all(torch.equal(v, gan_weights(reloaded)[k]) for k, v in gan_weights(twin).items())


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"class_loss_weight": 0.0}, r"twin_classifier true .* conditional true and class_loss_weight > 0 \(got conditional True, class_loss_weight 0.0\)"),
        ({"conditional": False}, r"twin_classifier true .* conditional true and class_loss_weight > 0 \(got conditional False"),
    ],
)
def test_twin_classifier_refuses_a_model_without_an_auxiliary_classifier(options, expected):
    with pytest.raises(InputError, match=r"--model.init_args." + expected):
        GAN(**{**TINY_GAN, "image_size": 16, "num_classes": 3, "in_channels": 3, "twin_classifier": True, **options})


def test_on_data_without_labels_the_twin_falls_away_with_the_classifier_and_says_so(capsys):
    model = GAN(**{**TINY_GAN, "image_size": 16, "num_classes": 0, "in_channels": 3, "twin_classifier": True})
    assert model.discriminator.classifier is None and model.discriminator.twin_classifier is None
    assert "no class labels, so the GAN is unconditional: no auxiliary classifier, no twin" in capsys.readouterr().out
