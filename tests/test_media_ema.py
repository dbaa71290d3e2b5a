"""The GAN's EMA generator (StyleGAN2-ADA's G_ema): it is what samples and exports, it is in the checkpoint, and a
resumed run continues it exactly. Real Trainers and checkpoints, 16 px shapes, one batch per epoch."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from domains.media.data import MediaDataModule
from domains.media.model import GAN, seeded_noise
from domains.media.networks import ema_decay_at
from tests.helpers import QUIET, TINY_GAN, linked, shapes_module

FAST = {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 0, "enable_checkpointing": False, **QUIET}


class Unshuffled(MediaDataModule):
    """The shapes in a fixed order: the batches of a resumed run are those of an uninterrupted one (shuffling draws
    from torch's random state, which Lightning does not restore from a checkpoint)."""

    def train_dataloader(self):
        return self._loader("train")


class SeedEachBatch(pl.Callback):
    """The noise of the batch at global step ``s`` comes from seed ``s``, in a resumed run as in an uninterrupted one."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        torch.manual_seed(trainer.global_step)


def states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_ema_generator_samples_exports_and_resumes_like_an_uninterrupted_run(tmp_path):
    dm = Unshuffled(synthetic_samples=80, image_size=16, batch_size=16)
    settings = {**TINY_GAN, "ema_decay": 0.999, **linked(dm)}

    torch.manual_seed(0)
    uninterrupted = GAN(**settings)
    pl.Trainer(**{**FAST, "max_epochs": 3}, callbacks=[SeedEachBatch()], default_root_dir=tmp_path / "a").fit(uninterrupted, datamodule=dm)

    torch.manual_seed(0)
    first = GAN(**settings)
    trainer = pl.Trainer(**{**FAST, "max_epochs": 2}, callbacks=[SeedEachBatch()], default_root_dir=tmp_path / "b")
    trainer.fit(first, datamodule=dm)
    checkpoint = tmp_path / "b.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    ema_saved = {k[len("ema_generator.") :]: v for k, v in saved.items() if k.startswith("ema_generator.")}
    assert ema_saved and all(torch.equal(ema_saved[k], v) for k, v in states(first.ema_generator).items())  # in the checkpoint
    # after a few steps the average lags the raw generator (decay 3/12 then 5/14 by the warm-up)
    assert any(not torch.equal(v, first.generator.state_dict()[k]) for k, v in ema_saved.items() if v.is_floating_point() and "weight" in k)

    resumed = GAN(**settings)
    trainer = pl.Trainer(**{**FAST, "max_epochs": 3}, callbacks=[SeedEachBatch()], default_root_dir=tmp_path / "b")
    trainer.fit(resumed, datamodule=dm, ckpt_path=checkpoint)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    # one more generator step: EMA = d * saved EMA + (1 - d) * the new raw weights, d at generator step 3 (not restarted at 1)
    decay = ema_decay_at(0.999, 3)
    raw = states(resumed.generator)
    for name, value in states(resumed.ema_generator).items():
        want = decay * ema_saved[name] + (1 - decay) * raw[name] if name in dict(resumed.generator.named_parameters()) else raw[name]
        torch.testing.assert_close(value, want, rtol=0, atol=1e-6, msg=name)
    # and the whole resumed run equals the uninterrupted one (same noise and shuffling per epoch), generator and EMA
    for name, value in {**states(uninterrupted.generator), **{"ema." + k: v for k, v in states(uninterrupted.ema_generator).items()}}.items():
        other = states(resumed.generator)[name] if not name.startswith("ema.") else states(resumed.ema_generator)[name[4:]]
        torch.testing.assert_close(other, value, rtol=0, atol=1e-6, msg=name)

    # the EMA generator draws the samples and is what exports; the raw generator only trains
    seeds, labels = [1, 2, 3], torch.tensor([0, 1, 2])
    resumed.eval()
    with torch.no_grad():
        noise = seeded_noise(seeds, resumed.noise_shape())
        samples = resumed.generate(seeds, labels)
        torch.testing.assert_close(samples, resumed.ema_generator(noise, labels).clamp(-1, 1))
        assert (samples - resumed.generator.eval()(noise, labels).clamp(-1, 1)).abs().max() > 1e-3
        exported = resumed.export_spec(None).module
        torch.testing.assert_close(exported(noise, labels), ((samples + 1) / 2).clamp(0, 1), rtol=0, atol=1e-6)
        # its batch-norm statistics are recomputed from its own weights alone: the checkpoint (saved before any sampling,
        # with the raw generator's statistics) samples the same images, and they differ from those raw statistics'
        loaded = GAN.load_from_checkpoint(tmp_path / "c.ckpt", map_location="cpu", weights_only=True).eval()
        torch.testing.assert_close(loaded.generate(seeds, labels), samples, rtol=0, atol=1e-6)
        stale = GAN.load_from_checkpoint(tmp_path / "c.ckpt", map_location="cpu", weights_only=True).eval()
        assert (stale.ema_generator(noise, labels).clamp(-1, 1) - samples).abs().max() > 1e-3


def test_gan_checkpoint_without_an_ema_generator_loads_with_the_generator_as_its_ema(tmp_path, capsys):
    dm = shapes_module()
    model = GAN(**TINY_GAN, **linked(dm))
    pl.Trainer(**FAST, default_root_dir=tmp_path).fit(model, datamodule=dm)
    old = tmp_path / "old.ckpt"
    model.trainer.save_checkpoint(old)
    checkpoint = torch.load(old, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ema_generator.")}
    checkpoint["hyper_parameters"].pop("ema_decay")
    torch.save(checkpoint, old)
    loaded = GAN.load_from_checkpoint(old, map_location="cpu", weights_only=True)
    assert "no EMA generator" in capsys.readouterr().out
    assert all(torch.equal(v, loaded.generator.state_dict()[k]) for k, v in loaded.ema_generator.state_dict().items())


def test_ema_decay_is_checked():
    import pytest

    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\), got 1.0"):
        GAN(**TINY_GAN, ema_decay=1.0)
