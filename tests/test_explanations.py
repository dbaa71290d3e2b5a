"""Explanations checked on data whose answer is known (issue 18, item 2).

- Healthcare: MONAI's Grad-CAM on the synthetic lesions (whose masks are known) peaks on the lesion
  for a model that learned them and does not for the same network untrained; the test grid of heat
  maps reaches the run folder and report.html; ``predict --explain`` writes one heat map per image
  beside the predictions, complete, and is refused for a model that gives none.
- Finance: a feature pushed to an extreme is named as the top reason by the VAE, in ``predict``'s
  file and in the served answer of the exported bundle.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from domains.healthcare.explain import GRADCAM_LAYERS, explainable_copy, gradcam_layer, gradcam_maps
from domains.healthcare.networks import build_network
from domains.healthcare.synthetic import lesion_masks, make_lesion_images
from pipelines.errors import InputError
from tests.conftest import copy_run, only_run, run_pipeline

LESION_SIZE = 32
TOLERANCE = 4  # pixels around a lesion still counted as on it (layer4 of a small-stem ResNet sees 8-pixel cells at 32 pixels)


# ----- healthcare: Grad-CAM ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet10", "densenet121", "efficientnet-b0"])  # the ResNets share their layer names
def test_every_network_has_a_target_layer_that_gives_maps_of_the_image_size(name):
    assert {GRADCAM_LAYERS[n] for n in GRADCAM_LAYERS if n.startswith("resnet")} == {"layer4"}
    network = build_network(name, 2, 1, 3, small_input_stem=name.startswith("resnet")).eval().requires_grad_(False)
    images = torch.randn(2, 1, 32, 32)
    maps = gradcam_maps(network, gradcam_layer(name, network), images, torch.tensor([0, 2]))
    assert maps.shape == (2, 32, 32) and bool(torch.isfinite(maps).all()) and 0 <= float(maps.min()) and float(maps.max()) <= 1


def test_an_unknown_target_layer_is_refused_naming_the_network():
    with pytest.raises(InputError, match="no Grad-CAM target layer is known for network 'vit'"):
        gradcam_layer("vit", torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="has no module 'layer4'"):
        gradcam_layer("resnet18", torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)))  # a network that is not the MONAI ResNet


def lesion_hits(task, images: torch.Tensor, masks: np.ndarray, classes: torch.Tensor) -> tuple[float, float]:
    """Share of images whose heat-map peak lies on the lesion (within TOLERANCE), and the mean share of
    heat-map mass on it divided by the lesion's share of the image (1 = no better than spread evenly)."""
    network = explainable_copy(task)
    maps = gradcam_maps(network, gradcam_layer(task.hparams.network, network), images, classes).numpy()
    near = torch.nn.functional.max_pool2d(torch.from_numpy(masks[:, None]).float(), 2 * TOLERANCE + 1, 1, TOLERANCE)[:, 0].numpy() > 0
    peaks = [near[i].flat[int(np.argmax(m))] for i, m in enumerate(maps)]
    mass = [(m[near[i]].sum() / max(m.sum(), 1e-12)) / near[i].mean() for i, m in enumerate(maps)]
    return float(np.mean(peaks)), float(np.mean(mass))


def test_gradcam_peaks_on_the_synthetic_lesions_once_learned_and_not_before():
    import lightning.pytorch as pl

    from domains.healthcare.data import MedicalImageDataModule
    from domains.healthcare.model import ImageClassifier

    data = MedicalImageDataModule(synthetic_samples=480, synthetic_image_size=LESION_SIZE, batch_size=32, val_fraction=0.1, test_fraction=0.1)
    data.setup("fit")
    pl.seed_everything(0)
    task = ImageClassifier(network="resnet10", width=0.25, lr=3e-3, num_classes=3, class_names=data.class_names,
                           class_weights=data.class_weights, sample_grid_size=0)  # fmt: skip
    untrained = ImageClassifier(**task.hparams)
    untrained.load_state_dict(task.state_dict())
    # unseen images (another seed) with a lesion, normalised as training normalised; each explained for its true class
    pixels, labels = make_lesion_images(160, LESION_SIZE, seed=7)
    lesion = labels > 0
    images = (torch.from_numpy(pixels[lesion][:, None]).float() / 255 - data.channel_mean[0]) / data.channel_std[0]
    masks, classes = lesion_masks(160, LESION_SIZE, seed=7)[lesion], torch.from_numpy(labels[lesion])
    trainer = pl.Trainer(max_epochs=6, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small network: one thread is ~10x faster than two contended ones on a busy 2-core machine
    try:
        trainer.fit(task, datamodule=data)  # ~70 steps, a few seconds
        task.eval()
        with torch.no_grad():
            accuracy = float((task(images).argmax(1) == classes).float().mean())
        learned, before = lesion_hits(task, images, masks, classes), lesion_hits(untrained.eval(), images, masks, classes)
    finally:
        torch.set_num_threads(threads)
    print(f"lesion images: {len(images)}; accuracy {accuracy:.2f}; peak on lesion / mass ratio: trained {learned}, untrained {before}")
    assert accuracy > 0.75, "the model did not learn the lesions: the test would say nothing"
    # measured: trained 0.97 of peaks on the lesion, 1.8x its share of mass; untrained 0.29 and 0.44x
    assert learned[0] >= 0.8 and learned[1] >= 1.4, learned
    assert before[0] <= learned[0] - 0.3 and before[1] <= learned[1] - 0.5, (before, learned)


def test_the_test_grid_has_heat_maps_and_predict_explain_writes_one_per_image(tiny_run, runs_dir):
    run = tiny_run("healthcare")
    grid = run / "plots" / "test_gradcam.png"
    assert grid.stat().st_size > 5000
    assert 'alt="test_gradcam"' in (run / "report.html").read_text()  # the report shows it
    assert (run / "plots" / "test_sample_predictions.png").stat().st_size > 5000

    run = copy_run(run, runs_dir)
    args = ("healthcare", "predict", "--run_id", run.name, "--runs_dir", str(runs_dir), "--ckpt_path", "best", "--trainer.limit_predict_batches=2")
    with pytest.raises(SystemExit) as crash:  # after the first batch's heat maps were written
        run_pipeline(*args, "--explain", "true", "--data.batch_size=8", "--trainer.callbacks+=tests.helpers.FailPredictBatch")
    assert crash.value.code == 1
    assert not list(run.glob("predictions*")) and not list(run.glob(".predictions*")), "a failed predict leaves no file and no folder"
    run_pipeline(*args, "--explain", "true")
    predictions = pd.read_csv(run / "predictions.csv")
    assert len(predictions) >= 10 and predictions["heatmap"].str.startswith("predictions.heatmaps/").all()
    folder = run / "predictions.heatmaps"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*predictions["heatmap"].str.split("/").str[1],
                                                               *predictions["heatmap"].str.split("/").str[1].str.replace(".png", ".npy")])  # fmt: skip
    for name in predictions["heatmap"]:
        heatmap = np.load(run / name.replace(".png", ".npy"))
        assert heatmap.shape == (32, 32) and np.isfinite(heatmap).all() and heatmap.min() >= 0 and heatmap.max() <= 1
        from PIL import Image

        with Image.open(run / name) as image:
            assert image.size[1] >= 128 and image.size[0] > 2 * image.size[1] - 8  # the image beside its overlay
    assert not list(run.glob(".*partial*"))
    run_pipeline(*args)  # without --explain: no column, no folder
    assert "heatmap" not in pd.read_csv(run / "predictions-2.csv").columns and not (run / "predictions-2.heatmaps").exists()


@pytest.mark.parametrize(("domain", "extra", "expected"), [
    ("finance", ("predict", "--explain", "true"), "--explain: FraudAutoencoder gives no per-item explanations"),
    ("healthcare", ("test", "--explain", "true"), "--explain writes explanations beside the predictions of `predict`; test writes no predictions"),
])  # fmt: skip
def test_explain_is_refused_where_nothing_would_be_explained(tiny_run, runs_dir, capsys, domain, extra, expected):
    run = copy_run(tiny_run(domain), runs_dir)
    before = sorted(p.name for p in run.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline(domain, extra[0], "--run_id", run.name, "--runs_dir", str(runs_dir), "--ckpt_path", "best", *extra[1:])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and expected in " ".join(err.split()), err[-2000:]
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written


# ----- finance: the VAE's per-feature reasons ---------------------------------------------------------
def test_the_vae_names_a_feature_pushed_to_an_extreme_as_the_top_reason_in_predict_and_served_answers(tmp_path):
    from domains.finance.serving import TransactionRowsAdapter
    from domains.finance.synthetic import make_card_transactions
    from pipelines.bundle_runtime import Bundle
    from pipelines.domain_registry import get_domain
    from pipelines.export import export_checkpoint

    runs = tmp_path / "runs"
    make_card_transactions(800, fraud_rate=0.05, seed=0).to_csv(tmp_path / "train.csv", index=False)
    common = ["--data.path", str(tmp_path / "train.csv"), "--model.architecture=vae", "--model.hidden_dims=[16]", "--model.latent_dim=4", "--data.batch_size=64"]
    run_pipeline("finance", "fit", *common, "--trainer.max_epochs=3", "--runs_dir", str(runs))
    run = only_run(runs, "finance")

    from domains.finance.preprocessing import TablePreprocessor

    fitted = TablePreprocessor.from_state_dict(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["TransactionDataModule"]["preprocessor"])
    normal = make_card_transactions(400, fraud_rate=0.0, seed=5).drop(columns=["is_fraud"]).head(60).reset_index(drop=True)
    pushed = normal.copy()
    columns = ["distance_from_home_km", "transactions_last_hour", "customer_age", "amount"]
    truth = [columns[i % len(columns)] for i in range(len(pushed))]
    for i, column in enumerate(truth):  # the training split's largest value: extreme, yet in range (no out_of_range path)
        high = fitted.highs[column]
        pushed.loc[i, column] = np.expm1(high) * 0.999 if column == "amount" else high  # amounts' range is of log1p(amount)
    pd.concat([normal, pushed]).to_csv(tmp_path / "score.csv", index=False)
    run_pipeline("finance", "predict", *common, "--runs_dir", str(runs), "--run_id", run.name, "--ckpt_path", "last", "--data.predict_path", str(tmp_path / "score.csv"))
    out = pd.read_csv(run / "predictions.csv")
    plain, changed = out.iloc[: len(normal)], out.iloc[len(normal) :]
    assert not any(column in str(outside) for column, outside in zip(truth, changed["out_of_range"].fillna("")))  # pushed within range
    named = float((changed["top_feature_1"].to_numpy() == np.array(truth)).mean())
    chance = float((plain["top_feature_1"].to_numpy() == np.array(truth)).mean())  # the same rows before the push
    print(f"top reason = the pushed feature: {named:.2f} of pushed rows, {chance:.2f} of the same rows unpushed")
    # measured 0.93 and 0.17: the misses are mild pushes (customer_age's maximum is ~2 robust deviations out) or rows
    # already holding a more extreme value of another column, which is then rightly named first
    assert named >= 0.85 and chance <= 0.4, (named, chance)
    contributions = out.filter(like="top_contribution_").to_numpy()
    assert (out["latent_contribution"] >= 0).all() and (contributions.sum(1) <= out["score"] + 1e-4).all()

    bundle = Bundle(export_checkpoint(get_domain("finance"), run / "checkpoints" / "last.ckpt", "onnx", tmp_path / "bundle"))
    adapter = TransactionRowsAdapter(bundle.metadata)
    rows = json.loads(pushed.assign(timestamp=pushed["timestamp"].astype(str)).to_json(orient="records"))
    answer = adapter.encode(adapter.infer(adapter.decode({"rows": rows}), bundle.run))
    served = [p["top_features"][0]["feature"] for p in answer["predictions"]]
    assert served == changed["top_feature_1"].tolist()
    np.testing.assert_allclose([p["latent_contribution"] for p in answer["predictions"]], changed["latent_contribution"], rtol=1e-3, atol=1e-3)


# ----- healthcare: multi-label Grad-CAM, one map per positive label --------------------------------
def spots_and_bars(folder, count: int, size: int = 32, seed: int = 0):
    """PNG images with a bright 5x5 square ("spot"), a dark 2x14 line ("bar") or both, at random places,
    on a grey noisy background; ``labels.csv`` (``spot``, ``bar``, ``spot|bar``; split by row) and the shapes' masks per file."""
    from tests.medical_files import write_png

    rng = np.random.default_rng(seed)
    rows, masks = [], {}
    for i in range(count):
        has = [[True, False], [False, True], [True, True]][i % 3]
        image = np.clip(rng.normal(128, 25, (size, size)), 0, 255)
        mask = np.zeros((2, size, size), bool)
        if has[0]:
            r, c = rng.integers(2, size - 7, 2)
            mask[0, r : r + 5, c : c + 5] = True
        if has[1]:
            r, c = rng.integers(2, size - 16, 2)
            mask[1, r : r + 2, c : c + 14] = True
        image[mask[0]], image[mask[1]] = 255, 0
        path = write_png(folder / "images" / f"img{i:03d}.png", image.astype(np.uint8))
        masks[path.name] = mask
        rows.append({"path": str(path.relative_to(folder)), "label": "|".join(n for n, h in zip(["spot", "bar"], has) if h),
                     "split": "test" if i >= count - 30 else ("val" if i % 10 == 0 else "train")})  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv", masks


def test_multilabel_gradcam_explains_each_positive_label_on_its_own_shape(tmp_path):
    csv, masks = spots_and_bars(tmp_path, 330)
    runs = tmp_path / "runs"
    args = (f"--data.labels_csv={csv}", "--data.batch_size=32", "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--runs_dir", str(runs))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small network: one thread is much faster than two contended ones on a busy 2-core machine
    try:
        run_pipeline("healthcare", "fit", *args, "--model.network=resnet10", "--model.width=0.25", "--model.lr=0.003", "--trainer.max_epochs=4")
        run = only_run(runs, "healthcare")
        run_pipeline("healthcare", "predict", *args, "--run_id", run.name, "--ckpt_path", "last", "--explain", "true")
    finally:
        torch.set_num_threads(threads)
    predictions = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert "heatmap" not in predictions.columns and {"heatmap_spot", "heatmap_bar"} <= set(predictions.columns)
    for name in ("spot", "bar"):  # a map for every label predicted positive, and only for those (an image with none: its most probable)
        positive = predictions[f"prob_{name}"] > 0.5
        top = predictions[["prob_spot", "prob_bar"]].idxmax(axis=1) == f"prob_{name}"
        assert ((predictions[f"heatmap_{name}"] != "") == (positive | (~positive & top & (predictions[["prob_spot", "prob_bar"]].max(axis=1) <= 0.5)))).all()
        assert predictions[f"heatmap_{name}"][positive].str.endswith(f"_{name}.png").all()
    folder = run / "predictions.heatmaps"
    assert len(list(folder.glob("*.png"))) == len(list(folder.glob("*.npy"))) == int((predictions[["heatmap_spot", "heatmap_bar"]] != "").sum().sum())

    both = predictions[(predictions["heatmap_spot"] != "") & (predictions["heatmap_bar"] != "")]
    assert len(both) >= 6, predictions[["item", "prob_spot", "prob_bar"]]  # the model learned both shapes: the test says something
    on_own, on_other = {"spot": [], "bar": []}, {"spot": [], "bar": []}
    for _, row in both.iterrows():
        mask = masks[row["item"].split("/")[-1]]
        for k, name in enumerate(("spot", "bar")):
            heatmap = np.load(run / (row[f"heatmap_{name}"].removesuffix(".png") + ".npy")).astype(np.float32)
            on_own[name].append(float(heatmap[mask[k]].mean()))
            on_other[name].append(float(heatmap[mask[1 - k]].mean()) if mask[1 - k].any() else np.nan)
    print({name: (np.mean(on_own[name]), np.nanmean(on_other[name])) for name in on_own})
    # each label's map lies on its own shape, not on the other label's (one map shared by both labels would fail one of the two)
    for name in ("spot", "bar"):
        assert np.mean(on_own[name]) > np.nanmean(on_other[name]) + 0.2, (name, on_own, on_other)


def test_requested_labels_are_explained_by_name_and_unknown_ones_refused():
    from domains.healthcare.explain import label_maps
    from domains.healthcare.model import ImageClassifier

    torch.manual_seed(0)
    task = ImageClassifier(task="multilabel", network="resnet10", width=0.25, num_classes=3, class_names=["a", "b", "c"], sample_grid_size=0).eval()
    network = explainable_copy(task)
    images = torch.randn(3, 1, 16, 16)
    maps = label_maps(task, network, gradcam_layer("resnet10", network), images, labels=["c", "a"])
    assert [list(m) for m in maps] == [["c", "a"]] * 3 and all(m["a"].shape == (16, 16) for m in maps)
    with pytest.raises(InputError, match=r"labels to explain \['d'\].*among its classes \['a', 'b', 'c'\]"):
        label_maps(task, network, gradcam_layer("resnet10", network), images, labels=["d"])
