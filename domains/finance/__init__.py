"""Finance: fraud detection as anomaly detection with a dense autoencoder or a VAE.

Data: the embedded synthetic card transactions (default), a CSV/Parquet transaction table with
column roles set in the config, or an ADBench ``.npz``. Importing this package imports nothing heavy.
"""

from pathlib import Path

from pipelines.domain_registry import DomainSpec

SPEC = DomainSpec(
    name="finance",
    model_class="domains.finance.model.FraudAutoencoder",
    datamodule_class="domains.finance.data.TransactionDataModule",
    config=Path(__file__).with_name("config.yaml"),
    links=(
        ("num_numeric", "num_numeric"),
        ("categorical_cardinalities", "categorical_cardinalities"),
        ("feature_groups", "feature_groups"),
        ("numeric_feature_groups", "numeric_feature_groups"),
        ("categorical_feature_groups", "categorical_feature_groups"),
    ),
    monitor="val/loss",
    mode="min",
    test_metrics=(("test/auprc", "max"), ("test/auroc", "max"), ("test/f1", "max"), ("test/precision", "max"), ("test/recall", "max"),
                  ("test/precision_at_budget", "max"), ("test/recall_at_budget", "max"), ("test/loss", "min"), ("test/alert_rate", ""),
                  ("test/ece", "min"), ("test/brier", "min")),  # fmt: skip
    selection=("test/auprc", "test/loss"),  # AUPRC where labels exist, else the reconstruction loss
    unit_dependent_metrics=("test/loss",),  # in each model's own robust-scaled units: compared only when the scales agree
    units_differences="domains.finance.units.units_differences",
    sanity_floors=("test/loss<inf", "test/loss<baseline", "test/auroc>0.5"),  # baseline: the untrained network
    # what the model reads, which a retrain keeps: the feature columns in their roles, the label, each timestamp column's
    # kind (with or without a time zone); id and ignored columns are not read by the model and may change
    schema_options=(*(f"preprocessor.roles.{role}" for role in ("numeric_columns", "amount_columns", "boolean_columns", "timestamp_columns", "categorical_columns")),
                    "preprocessor.label_classes", "preprocessor.timestamp_zones"),  # fmt: skip
    tags=("tabular", "anomaly-detection", "fraud"),
    test_args=(
        "--data.synthetic_rows=1200",
        "--data.batch_size=64",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=4",
        "--trainer.limit_test_batches=4",
        "--trainer.limit_predict_batches=1",
        "--data.predict_chunk_rows=100",
    ),
)
