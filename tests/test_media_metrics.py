"""Media metrics that mean something: one cached extractor per data set, cached reference statistics,
seeded KID, FID that ranks real images far ahead of noise and an untrained GAN; checkpoints and time limits."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from domains.media.data import MediaDataModule
from domains.media.features import load_extractor
from domains.media.model import GAN
from tests.conftest import kill_at_first_checkpoint
from tests.helpers import QUIET, TINY_GAN, linked, shapes_module


def test_one_extractor_per_data_set_cached_with_its_reference_statistics(tmp_path, capsys):
    """Two runs on one data set share one extractor (trained once, content-addressed) and one reference;
    another data set gets its own; the digest does not depend on key order; weights can be given."""
    from safetensors.torch import load_file, save_file

    from domains.media.features import extractor_digest

    cache = tmp_path / "cache"

    def fit(run: str, **data) -> GAN:
        dm = shapes_module(**data)
        model = GAN(**TINY_GAN, **linked(dm), extractor_cache=str(cache))
        pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, default_root_dir=tmp_path / run, **QUIET).fit(model, datamodule=dm)
        return model

    first = fit("a")
    assert "trained now and stored in" in capsys.readouterr().out
    stored = sorted((cache / "extractors").glob("*.safetensors"))
    references = sorted((cache / "references").glob("*-val-*.safetensors"))
    assert len(stored) == 1 and len(references) == 1
    stamps = {p: p.stat().st_mtime_ns for p in (*stored, *references)}
    second = fit("b")
    out = capsys.readouterr().out
    assert "reused from" in out and "reference statistics of the val split" in out and "computed" not in out
    assert {p: p.stat().st_mtime_ns for p in (*stored, *references)} == stamps  # nothing was trained or computed again
    assert first.extractor_sha256 == second.extractor_sha256 == extractor_digest(second.extractor)
    details = json.loads((tmp_path / "b" / "feature_extractor.json").read_text())
    assert details["sha256"] == first.extractor_sha256 and details["source"] == str(stored[0])
    assert details["recipe"].startswith("task+corruptions") and details["task"] == "classes"
    assert not list(cache.rglob("*.tmp"))  # written under a temporary name, then renamed

    # the same weights saved with the metadata keys in another order: the same digest
    reordered = tmp_path / "reordered.safetensors"
    state = load_file(str(stored[0]))
    meta = json.loads((stored[0].with_suffix(".json")).read_text())
    keys = ["recipe", "task_outputs", "task", "pooling", "width", "num_outputs", "channels"]
    save_file(dict(reversed(list(state.items()))), str(reordered), metadata={k: meta[k] for k in keys})
    assert reordered.read_bytes() != stored[0].read_bytes() and extractor_digest(load_extractor(reordered, 3)) == first.extractor_sha256

    fit("c", synthetic_seed=1)  # another data set: another extractor
    assert len(list((cache / "extractors").glob("*.safetensors"))) == 2
    given = GAN(**TINY_GAN, **linked(shapes_module()), feature_extractor_weights=str(reordered), extractor_cache=str(cache))
    assert all(torch.equal(a, b) for a, b in zip(given.extractor.state_dict().values(), first.extractor.state_dict().values()))
    with pytest.raises(ValueError, match="made for 3-channel images, the data has 1"):
        load_extractor(reordered, channels=1)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a feature extractor saved by the media domain"):
        load_extractor(tmp_path / "junk.safetensors", channels=3)


def test_fid_puts_held_back_real_images_far_ahead_of_noise_and_a_one_epoch_gan(tmp_path):
    """The metric measures realism: with one extractor and one reference (the validation split), held-back
    real images (the test split) score far better than uniform noise and than a one-epoch GAN's colour blobs."""
    from domains.media.metrics import features_of, fid, kid, reference_statistics

    pl.seed_everything(0, verbose=False)
    dm = MediaDataModule(synthetic_samples=640, image_size=16, batch_size=32, val_fraction=0.2, test_fraction=0.2)
    model = GAN(**{**TINY_GAN, "width": 16, "extractor_steps": 150, "extractor_width": 16, "fid_samples": 128}, extractor_cache=str(tmp_path), **linked(dm))
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, enable_checkpointing=False, **QUIET)
    trainer.fit(model, datamodule=dm)
    (val_images, _), (test_images, test_labels) = dm.split_tensors("val"), dm.split_tensors("test")
    reference = reference_statistics(features_of(model.extractor, val_images))
    noise = torch.rand(test_images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model.eval()
    samples = model.generate(list(range(len(test_labels))), test_labels)
    scores = {name: (fid(reference, features_of(model.extractor, x)), kid(reference, features_of(model.extractor, x))[0])
              for name, x in (("real", test_images), ("noise", noise), ("one_epoch", samples))}  # fmt: skip
    print(scores)
    assert scores["one_epoch"][0] > 5 * scores["real"][0] and scores["noise"][0] > 5 * scores["real"][0], scores
    assert scores["real"][1] < 0.1 * min(scores["one_epoch"][1], scores["noise"][1]), scores
    assert trainer.callback_metrics["val/real_share_cnn"] < 0.5  # the extractor takes most blobs for a corruption


def test_kid_subsets_are_seeded():
    from domains.media.metrics import kid, reference_statistics

    generator = torch.Generator().manual_seed(0)
    reference = reference_statistics(torch.randn(300, 16, generator=generator))
    fake = torch.randn(300, 16, generator=generator) + 0.3
    assert kid(reference, fake, subset_size=50) == kid(reference, fake, subset_size=50)
    assert kid(reference, fake, subset_size=50) != kid(reference, fake, subset_size=50, seed=1)  # subsets differ, so would KID


def test_killed_run_leaves_a_checkpoint_before_its_first_validation(runs_dir):
    """The domain config writes last.ckpt every 100 optimizer steps: with validation every second epoch,
    a run killed (SIGKILL) in its first epoch still leaves a checkpoint to resume from (before: none)."""
    args = ["media", "--data.synthetic_samples=600", "--data.image_size=16", "--data.batch_size=2", "--trainer.logger=false",
            *[f"--model.init_args.{k}={v}" for k, v in TINY_GAN.items()], "--trainer.max_epochs=1",
            "--trainer.check_val_every_n_epoch=2", "--runs_dir", str(runs_dir)]  # fmt: skip
    kill_at_first_checkpoint(args, "media/*/checkpoints/*.ckpt", runs_dir, settle=0.5)  # fails if the run ends first
    (last,) = runs_dir.glob("media/*/checkpoints/last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] % 100 == 0  # written by the every-100-steps rule, not at the end (480)
