"""Autonomous: sensor-sequence pipelines (trajectory forecasting, per-window regression and classification).

Data: the embedded vehicle simulator (default; kinematic bicycle model, noisy IMU/odometry,
lane changes and braking), any long CSV/TSV/Parquet table of (sequence, time, channels), or the
ETH/UCY pedestrian benchmark (``configs/eth_ucy.yaml``). Networks: LSTM/GRU encoder-decoders, a
conditional VAE drawing K futures, and PatchTST from ``transformers`` (``model.architecture``).
The monitor ``val/score`` is the task's primary error, lower is better (see ``model.py``).
Importing this package imports nothing heavy.
"""

from pathlib import Path

from pipelines.domain_registry import DomainSpec

SPEC = DomainSpec(
    name="autonomous",
    model_class="domains.autonomous.model.SensorSequenceModel",
    datamodule_class="domains.autonomous.data.SensorSequenceDataModule",
    config=Path(__file__).with_name("config.yaml"),
    links=(
        ("task", "task"),
        ("input_size", "input_size"),
        ("target_dim", "target_dim"),
        ("observe", "observe"),
        ("predict", "predict"),
        ("num_classes", "num_classes"),
        ("class_names", "class_names"),
        ("target_names", "target_names"),
        ("categories", "categories"),
        ("known_size", "known_size"),
    ),
    monitor="val/score",
    mode="min",
    test_metrics=(("test/score", "min"), ("test/loss", "min"), ("test/ade", "min"), ("test/fde", "min"), ("test/min_ade", "min"),
                  ("test/min_fde", "min"), ("test/rmse", "min"), ("test/mae", "min"), ("test/accuracy", "max"), ("test/f1", "max")),  # fmt: skip
    sanity_floors=("test/loss<inf", "test/score<inf"),
    schema_options=("task", "channel_names", "target_names", "class_names", "known_future_channels", "categorical_channels"),  # a retrain keeps them
    tags=("time-series", "trajectory-forecasting", "sensors"),
    test_args=(
        "--data.sim_vehicles=60",
        "--data.batch_size=32",
        "--model.hidden_size=16",
        "--model.embed_size=8",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--trainer.limit_predict_batches=2",
    ),
)
