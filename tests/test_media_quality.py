"""Media sample quality beyond FID: improved precision and recall, the nearest-neighbour memorisation
check, Inception weights from a local file; each metric shown to separate good samples from bad ones."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from domains.media.data import MediaDataModule
from domains.media.model import GAN
from domains.media.quality import TrainingNeighbours, memorisation, offline_scores, precision_recall
from tests.bad_inputs import BadInput, check_refused, params
from tests.helpers import QUIET, TINY_GAN, linked


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the media models run (``cpu_threads``): on a shared 2-core machine two contended
    threads made the extractor's training here 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, one_thread):
    """640 synthetic 16x16 shapes (384 train, 128 val, 128 test) and their extractor, trained once and saved."""
    from domains.media.features import accuracy, save_extractor, train_feature_cnn

    folder = tmp_path_factory.mktemp("shapes")
    pl.seed_everything(0, verbose=False)
    dm = MediaDataModule(synthetic_samples=640, image_size=16, batch_size=32, val_fraction=0.2, test_fraction=0.2)
    images, labels = dm.split_tensors("train")
    net = train_feature_cnn(images, labels, steps=150, width=16)
    path = save_extractor(net, folder / "extractor.safetensors", {"val_accuracy": accuracy(net, *dm.split_tensors("val"))})
    return dm, net, path


class Replay(GAN):
    """A "generator" that returns given images (in order) whatever its noise: training images (a model that
    memorised its data) or held-back real ones (a perfect model that never saw them)."""

    replay: torch.Tensor

    def sample(self, noise, labels, steps=None, sampler=None):
        return self.replay[: len(noise)].to(noise.device)


def test_real_images_score_far_ahead_of_noise_and_a_barely_trained_gan_on_every_metric(shapes, tmp_path):
    """The sanity check of the metrics: against one reference (the validation split), held-back real images
    (the test split) have a low FID/KID and precision and recall near their maximum; uniform noise and a GAN
    after 8 batches (colour blobs) have a far higher FID/KID and precision and recall far below (under a quarter of) the real images'."""
    from domains.media.metrics import features_of, reference_statistics

    dm, net, path = shapes
    pl.seed_everything(0, verbose=False)
    model = GAN(**{**TINY_GAN, "width": 16, "grid_samples": 0}, feature_extractor_weights=str(path), extractor_cache=str(tmp_path), **linked(dm))
    pl.Trainer(max_epochs=1, limit_train_batches=8, limit_val_batches=0, default_root_dir=tmp_path, **QUIET).fit(model, datamodule=dm)
    (val_images, _), (train_images, _), (test_images, test_labels) = dm.split_tensors("val"), dm.split_tensors("train"), dm.split_tensors("test")
    reference = reference_statistics(features_of(net, val_images))
    neighbours = TrainingNeighbours(features_of(net, train_images), reference["features"])
    model.eval()
    candidates = {
        "real": test_images,
        "noise": torch.rand(test_images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1,
        "barely_trained": model.generate(list(range(len(test_labels))), test_labels),
    }
    scores = {name: offline_scores(net, "test", reference, images, test_labels, 100, 0, neighbours) for name, images in candidates.items()}
    scores = {name: {key.split("/")[1].removesuffix("_cnn"): value for key, value in row.items()} for name, row in scores.items()}
    print(json.dumps(scores, indent=1))
    real = scores["real"]
    assert real["precision"] > 0.6 and real["recall"] > 0.6, real
    for name in ("noise", "barely_trained"):
        bad = scores[name]
        assert bad["fid"] > 5 * real["fid"] and real["kid"] < 0.1 * bad["kid"], (name, bad, real)
        # far below real images (0.9): the EMA generator of 8 batches draws a few plausible blobs (precision 0.16 measured)
        assert bad["precision"] < 0.25 * real["precision"] and bad["recall"] < 0.25 * real["recall"], (name, bad, real)
    assert 0.5 < real["train_distance_ratio"] < 2 and real["memorised_share"] < 0.2  # new real images: as far from the training set as the val split


def test_memorisation_check_tells_a_model_that_copies_its_training_images(shapes, tmp_path):
    """Through the product's test: a "generator" that returns training images scores memorised_share ~1 and a
    distance ratio ~0; one that returns held-back real images (the val split, never trained on) ~0.05 and ~1.
    The metrics reach summary.json and report.html."""
    from pipelines.report import build_report
    from pipelines.tracking import RunSummary

    dm, _, path = shapes
    results = {}
    for name, split in (("copies_training_images", "train"), ("new_real_images", "val")):
        model = Replay(**{**TINY_GAN, "grid_samples": 0, "fid_samples": 128}, feature_extractor_weights=str(path), extractor_cache=str(tmp_path / "cache"), **linked(dm))
        model.replay = dm.split_tensors(split)[0]
        run = tmp_path / name
        run.mkdir()
        pl.Trainer(default_root_dir=run, callbacks=[RunSummary(run, "val/fid_cnn", "min")], **QUIET).test(model, datamodule=dm)
        results[name] = json.loads((run / "summary.json").read_text())["test"]
        report = build_report(run, "media")
        for key in ("precision_cnn", "recall_cnn", "memorised_share_cnn", "train_distance_ratio_cnn"):
            assert f"<td>test/{key}</td>" in report, key
    copies, new = results["copies_training_images"], results["new_real_images"]
    print(json.dumps(results, indent=1))
    # 0.05 expected for new images; 5 % of 128 held-back images is a noisy threshold (0.19 measured with the val split)
    assert copies["test/memorised_share_cnn"] > 0.95 and new["test/memorised_share_cnn"] < 0.35, results
    assert copies["test/train_distance_ratio_cnn"] < 0.05 and 0.5 < new["test/train_distance_ratio_cnn"] < 2, results
    # both are real images: precision cannot tell them apart, which is why the memorisation check exists
    assert copies["test/precision_cnn"] > 0.6 and new["test/precision_cnn"] > 0.6, results


def test_precision_and_recall_tell_fidelity_from_coverage():
    """One real point repeated: precise but no coverage; a shifted cloud: neither; k must fit the sets."""
    generator = torch.Generator().manual_seed(0)
    real, other = torch.randn(300, 16, generator=generator), torch.randn(300, 16, generator=generator)
    precision, recall = precision_recall(real, other)
    assert precision > 0.7 and recall > 0.7, (precision, recall)  # two samples of one distribution (16-d: not 1)
    collapsed = real[:1].repeat(300, 1) + 0.01 * torch.randn(300, 16, generator=generator)
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.05  # mode collapse: every sample realistic, one image's worth of variety
    assert precision_recall(real, other + 5) == (0.0, 0.0)
    assert precision_recall(real, other, k=5) != precision_recall(real, other, k=3)  # k is honoured
    with pytest.raises(ValueError, match="need at least 4 points, got 3"):
        precision_recall(real[:3], other[:3])
    train = torch.randn(500, 16, generator=generator)
    assert memorisation(train, real, train[:50]) == {"memorised_share": 1.0, "train_distance_ratio": 0.0}


# ----- Inception weights from a local file ---------------------------------------------------------------
def inception_like(folder, **shapes) -> None:
    """A state dict with the tensor names of torch-fidelity's FID Inception, at the given shapes (others right)."""
    sizes = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1), "fc.weight": (1008, 2048), **shapes}
    torch.save({name: torch.zeros(size) for name, size in sizes.items()}, folder / "inception.pth")


WEIGHTS = ("--data.synthetic_samples=60", "--data.image_size=16", "--model.init_args.inception_weights", "{tmp}/inception.pth")
CASES = [
    BadInput("inception_weights_missing", WEIGHTS, ("--model.init_args.inception_weights", "inception.pth", "file not found"), None),
    BadInput("inception_weights_pickled_object", WEIGHTS, ("inception.pth", "not a weights-only file", "nothing in it was run", "argparse.Namespace"),
             lambda f: torch.save({"fc.weight": torch.zeros(2), "options": argparse.Namespace(x=1)}, f / "inception.pth")),  # fmt: skip
    BadInput("inception_weights_not_a_torch_file", WEIGHTS, ("inception.pth", "not a weights-only file"), lambda f: (f / "inception.pth").write_text("weights")),
    BadInput("inception_weights_a_list", WEIGHTS, ("inception.pth", "expected a state dict", "list"), lambda f: torch.save([torch.zeros(2)], f / "inception.pth")),
    BadInput("inception_weights_imagenet_classifier", WEIGHTS, ("inception.pth", "not torch-fidelity's FID Inception weights", "(1000, 2048)"),
             lambda f: inception_like(f, **{"fc.weight": (1000, 2048)})),  # fmt: skip
]


@pytest.mark.parametrize("case", params(CASES))
def test_inception_weights_file_is_checked_before_anything_is_written(case, tmp_path, capsys):
    message = check_refused("media", case, tmp_path, capsys)
    assert "Union subtypes" not in message and "Given value" not in message, message  # the model's own words, not jsonargparse's wrapping


def torch_fidelity_works() -> bool:
    try:
        import torch_fidelity  # noqa: F401  (imports torchvision, which must match this torch)
    except Exception:
        return False
    return True


def test_inception_weights_in_the_right_format_need_torch_fidelity_or_are_used(tmp_path):
    """A file in torch-fidelity's format: without torch-fidelity the option says what to install; with it the
    metrics' Inception holds exactly the file's weights (a randomly initialised network saved here: no download)."""
    if not torch_fidelity_works():
        inception_like(tmp_path)
        with pytest.raises(ValueError, match=r"inception_weights .*inception.pth needs torch-fidelity"):
            GAN(image_size=16, inception_weights=str(tmp_path / "inception.pth"))
        return
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):  # keep the random initialisation
            return None

    torch.save({}, tmp_path / "empty.pth")
    state = Untrained("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth")).state_dict()
    torch.save(state, tmp_path / "inception.pth")
    model = GAN(image_size=16, inception_weights=str(tmp_path / "inception.pth"))
    fid_metric, kid_metric = model.inception
    used = fid_metric.inception.state_dict()
    assert all(torch.equal(used[name], tensor) for name, tensor in state.items())
    assert kid_metric.inception.network is fid_metric.inception  # one network for both


# ----- retraining: champion and challenger scored with one extractor -----------------------------------
def test_retraining_scores_champion_and_challenger_with_the_same_extractor(tmp_path, capsys):
    """A champion trained with other scoring options (extractor steps and width, its own extractor cache, sample
    count) than the challenger: the retrain evaluation gives its checkpoint copy the challenger's values
    (``DomainSpec.scoring_options``), so both are tested with one extractor and the same number of samples.
    Without that step the two evaluations use different extractors (checked too: the test can fail)."""
    import shutil

    from pipelines.domain_registry import get_domain
    from pipelines.evaluation_set import align_scoring_options, score
    from tests.conftest import run_pipeline

    def train(name: str, **options) -> Path:  # through the runner, as retraining trains
        settings = [f"--model.init_args.{key}={value}" for key, value in options.items()]
        run_pipeline("media", "fit", *get_domain("media").test_args, *settings, "--trainer.max_epochs=1", "--trainer.logger=false",
                     "--runs_dir", str(tmp_path / "trained"), "--run_id", name)  # fmt: skip
        return tmp_path / "trained" / "media" / name / "checkpoints" / "best.ckpt"

    champion = train("champion", extractor_steps=3, extractor_width=16, fid_samples=12, extractor_cache=str(tmp_path / "old-cache"))
    challenger = train("challenger", extractor_steps=2, extractor_width=8, fid_samples=16, extractor_cache=str(tmp_path / "new-cache"))
    record = {"data": {"synthetic_samples": 120, "image_size": 16, "batch_size": 16}}  # the test_args' data
    base = {"seed_everything": 0, "trainer": {"logger": False, "enable_progress_bar": False, "limit_test_batches": 1}}
    model = {"model": {"class_path": "domains.media.model.GAN"}}

    def evaluate(checkpoint, label: str) -> dict:
        result = score("media", record, checkpoint, model, base, tmp_path / "runs", label, tmp_path / f"{label}.yaml")
        return {**result["metrics"], "sha256": json.loads((tmp_path / "runs" / "media" / label / "feature_extractor.json").read_text())["sha256"]}

    as_trained = evaluate(champion, "champion-as-trained")
    copy = tmp_path / "champion-copy.ckpt"
    shutil.copyfile(champion, copy)
    changed = align_scoring_options(copy, challenger, get_domain("media").scoring_options)
    assert changed["extractor_width"] == (16, 8) and changed["fid_samples"] == (12, 16) and changed["extractor_cache"][1].endswith("new-cache")
    aligned, challenger_scores = evaluate(copy, "champion-aligned"), evaluate(challenger, "challenger")
    assert aligned["sha256"] == challenger_scores["sha256"] != as_trained["sha256"]
    assert torch.load(champion, weights_only=True)["hyper_parameters"]["extractor_width"] == 16  # the original is untouched
    assert all(k in aligned for k in ("test/fid_cnn", "test/precision_cnn", "test/memorised_share_cnn"))
