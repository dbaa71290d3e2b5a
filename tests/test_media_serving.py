"""Media export and serving: ONNX/TorchScript bundles, the numpy DDIM loop and the seed form over real HTTP."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from domains.media.model import GAN, Diffusion
from tests.helpers import TINY_DIFFUSION, TINY_GAN, decode_pngs, request, save_checkpoint, start_server


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
    """An (untrained, randomly initialised) conditional GAN exported to ONNX and served on a loopback port; with the
    default config's reflect padding in the generator, so its export (ONNX reflect ``Pad``) is what is checked."""
    import signal

    from pipelines.domain_registry import get_domain
    from pipelines.export import export_checkpoint

    folder = tmp_path_factory.mktemp("media-serve")
    torch.manual_seed(0)
    model = GAN(**TINY_GAN, generator_padding="reflect", **GEOMETRY).eval()
    bundle = export_checkpoint(get_domain("media"), save_checkpoint(model, folder / "g.ckpt"), "onnx", folder / "bundle")
    server = start_server("media", bundle, folder / "server.log", "--max_batch_size", "8", "--batch_timeout", "0.02")
    try:
        yield server, model
        server.stop(signal.SIGTERM)
    finally:
        server.kill()


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
