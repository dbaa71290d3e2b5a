"""Media: synthetic image generation with a GAN or a diffusion model.

Data: the embedded coloured-shapes set (default), a folder of PNG/JPEG images (sub-folders as class
labels) or an ``.npz`` image array such as MNIST. Models: a spectral-norm hinge-loss DCGAN
(``domains.media.model.GAN``, manual optimisation) or a MONAI diffusion UNet with EMA and DDIM
sampling (``domains.media.model.Diffusion``), switched by ``model.class_path``. Quality: FID/KID
with an offline feature extractor trained on the data (``val/fid_cnn``) or Inception (a local weights
file, or downloaded), improved precision/recall and a memorisation check (``domains/media/quality.py``).
Importing this package imports nothing heavy.

Examples::

    python -m pipelines.run media                                                  # GAN on shapes
    python -m pipelines.run media --model domains.media.model.Diffusion            # diffusion
    python -m pipelines.run media --data.npz_path ../shared/data/media/mnist.npz --data.image_size 28
    python -m pipelines.run media predict --ckpt_path best --data.num_generate 100  # PNGs in <run>/generated
"""

from pathlib import Path

from pipelines.domain_registry import DomainSpec

SPEC = DomainSpec(
    name="media",
    model_class="domains.media.model.GenerativeTask",
    datamodule_class="domains.media.data.MediaDataModule",
    config=Path(__file__).with_name("config.yaml"),
    links=(
        ("in_channels", "in_channels"),
        ("image_size", "image_size"),
        ("num_classes", "num_classes"),
        ("class_names", "class_names"),
    ),
    monitor="val/fid_cnn",
    mode="min",
    test_metrics=(
        ("test/fid_*", "min"), ("test/kid_*_std", ""), ("test/kid_*", "min"), ("test/class_acc_*", "max"), ("test/class_balanced_acc_*", "max"),
        ("test/real_class_*", ""), ("test/real_share_*", "max"),
        ("test/precision_*", "max"), ("test/recall_*", "max"), ("test/memorised_share_*", "min"), ("test/train_distance_ratio_*", ""),
    ),  # fmt: skip
    sanity_floors=("test/fid_cnn<inf",),
    # how samples are measured: retraining scores the champion with the challenger's values (the same extractor)
    scoring_options=(
        "fid_samples", "kid_subset_size", "extractor_steps", "extractor_width", "extractor_max_images", "feature_extractor_weights",
        "extractor_cache", "inception_metrics", "inception_weights",
    ),  # fmt: skip
    model_subclasses=True,
    tags=("image", "generative", "gan", "diffusion", "monai"),
    test_args=(
        "--data.synthetic_samples=120",
        "--data.image_size=16",
        "--data.batch_size=16",
        "--data.num_generate=20",
        "--model.init_args.width=16",
        "--model.init_args.generator_width=16",
        "--model.init_args.fid_samples=32",
        "--model.init_args.grid_samples=8",
        "--model.init_args.extractor_steps=2",
        "--model.init_args.extractor_width=8",
        "--trainer.max_epochs=2",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--trainer.limit_predict_batches=2",
    ),
)
