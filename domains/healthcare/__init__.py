"""Healthcare: medical image classification (binary, multi-class, multi-label; 2-D and 3-D).

Data: the embedded synthetic lesion set (default), MedMNIST ``.npz`` files, or a folder of
PNG/JPEG/DICOM/NIfTI images with a ``path,label[,split]`` CSV (README.md: formats, validation rules,
the intensity rule). Networks: MONAI's ResNets,
DenseNet121 and EfficientNet-B0. Importing this package imports nothing heavy.
"""

from pathlib import Path

from pipelines.domain_registry import DomainSpec

SPEC = DomainSpec(
    name="healthcare",
    model_class="domains.healthcare.model.ImageClassifier",
    datamodule_class="domains.healthcare.data.MedicalImageDataModule",
    config=Path(__file__).with_name("config.yaml"),
    links=(
        ("num_classes", "num_classes"),
        ("in_channels", "in_channels"),
        ("spatial_dims", "spatial_dims"),
        ("task", "task"),
        ("class_names", "class_names"),
        ("class_weights", "class_weights"),
        ("positive_class", "positive_class"),
        ("image_shape", "input_shape"),
    ),
    monitor="val/auroc",
    mode="max",
    test_metrics=(("test/auroc", "max"), ("test/accuracy", "max"), ("test/f1", "max"), ("test/f1_*", "max"), ("test/loss", "min"),
                  ("test/ece", "min"), ("test/brier", "min"), ("test/sensitivity", "max"), ("test/specificity", "max")),  # fmt: skip
    sanity_floors=("test/loss<inf", "test/auroc>0.5"),
    schema_options=("class_names", "positive_class", "task"),  # also when inferred from the labels: a retrain keeps them
    tags=("image", "classification", "monai"),
    test_args=(
        "--data.synthetic_samples=96",
        "--data.batch_size=16",
        "--model.width=0.25",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--trainer.limit_predict_batches=2",
    ),
)
