"""``SensorSequenceModel``: forecasting, regression and classification of sensor windows.

One LightningModule for the three tasks (the task is linked from the data); one key,
``model.architecture``, picks the network family (``networks.py``):

=================  ===========================================  ===============================
architecture       forecasting                                  regression / classification
=================  ===========================================  ===============================
``rnn``            LSTM/GRU encoder-decoder (``cell``)          LSTM/GRU encoder + MLP head
``cvae``           conditional VAE, K futures (best-of-K)       (not available)
``mixture``        M-mode mixture (MultiPath-style), top K      (not available)
``transformer``    ``transformers`` PatchTST (from a config)    PatchTST encoder + MLP head
=================  ===========================================  ===============================

Forecasters predict normalised displacements; positions are the last observed position plus
their cumulative sum, in the data's units. The loss is the mean squared error of those relative
positions (in units of the displacement scale), plus ``kl_weight`` x KL for the CVAE; the mixture
is trained winner-takes-all (relaxed by ``wta_epsilon``) plus the cross-entropy of its mode logits. Teacher
forcing starts at ``teacher_forcing`` and decays linearly to 0 over ``teacher_forcing_epochs``.

Metrics (torchmetrics, DDP-synchronised): forecasting ``ade``, ``fde`` (single prediction; the
CVAE decodes its prior mean, the mixture takes its most probable mode), ``min_ade``, ``min_fde``
(best of ``num_samples`` futures, stochastic forecasters only; drawn per window at evaluation: :func:`~domains.autonomous.evaluation.evaluation_draws`), ``rmse``, ``mae`` (per coordinate, data units); regression ``rmse``, ``mae`` (data units);
classification ``accuracy``, ``f1`` (macro). Test adds the displacement error per horizon step
(``de_step_<k>``), per-channel occlusion attributions (``attributions.py``) and, with ``quantiles``,
the coverage of the predicted quantiles and intervals (``pipelines/quantiles.py``); classification
probabilities are temperature-calibrated on validation (``pipelines/classifier_calibration.py``).

The primary metric: the domain has one monitor, so every task logs ``val/score``, lower is better,
defined per task as the number the literature ranks by: forecasting ADE (``min_ade`` for the
stochastic forecasters, ``ade`` otherwise), regression RMSE, classification error rate
(``1 - accuracy``). The named metrics are logged beside it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import Accuracy, ConfusionMatrix, F1Score, MeanAbsoluteError, MeanSquaredError, MetricCollection

from domains.autonomous.attributions import AttributionColumns
from domains.autonomous.metrics import DisplacementError, StepDisplacementError, VectorMean
from domains.autonomous.network_choice import make_network
from domains.autonomous.evaluation import check_model_options, evaluation_draws, keep_for_plot, log_test_outputs, occlusion
from pipelines.classifier_calibration import ClassifierCalibration
from pipelines.evaluation_means import EvaluationMeans
from pipelines.export_spec import ExportSpec
from pipelines.grouped_steps import GroupedSteps, check_batches_per_step, grouped_training_step
from pipelines.quantiles import QuantileCoverage, median_index, pinball_loss
from pipelines.task import BaseTask


class SensorSequenceModel(GroupedSteps, BaseTask):
    """Forecast, regress or classify windows of sensor sequences.

    Args:
        architecture: ``rnn`` (LSTM/GRU), ``cvae`` or ``mixture`` (stochastic forecasters, K futures) or
            ``transformer`` (PatchTST from ``transformers``, built from a config).
        cell: recurrent cell of ``rnn`` and ``cvae``: ``lstm`` or ``gru``.
        hidden_size: RNN width (PatchTST: ``d_model``).
        embed_size: per-step embedding width of the RNNs.
        num_layers: stacked RNN or transformer layers.
        dropout: dropout inside the networks.
        latent_size: CVAE latent size.
        kl_weight: weight of the CVAE's KL term.
        num_samples: futures drawn by the stochastic forecasters for min-of-K metrics (K; 20 in the literature).
        modes: mixture components of ``mixture``.
        wta_epsilon: share of the ``mixture`` regression loss spread over the modes that did not win
            (relaxed winner-takes-all, so that no mode is left untrained).
        num_heads: PatchTST attention heads.
        patch_length: PatchTST patch length (and stride), at most ``observe``.
        teacher_forcing: initial probability of feeding the true displacement to the decoder.
        teacher_forcing_epochs: epochs over which teacher forcing decays linearly to 0.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``cosine``, ``step`` or ``constant``.
        plot_samples: windows drawn in the test trajectory plot (0 disables plots).
        velocity_residual: forecasters predict each future displacement as a change from the last
            observed one (a constant-velocity prior that the network corrects).
        batches_per_step: mini-batches per Lightning step, one optimizer step each, same numerics (:mod:`pipelines.grouped_steps`).
        cpu_threads: torch intra-op threads while this model runs on CPU (restored afterwards);
            small recurrent networks run fastest on 1, and several threads spin badly on a busy
            machine; ``None`` keeps torch's setting.
        quantiles: regression and forecasting (``rnn``, ``transformer``): predict these quantile levels
            (increasing, in (0, 1), with 0.5: the median is the point prediction) with the pinball loss
            instead of one value with the MSE; ``predict`` writes a column per level, ``test`` logs
            their coverage. ``None``: the point model.
        calibrate: classification: fit a temperature on the validation logits after every validation
            epoch; predictions, exports and the server give the calibrated probabilities.
        explain: ``predict`` also writes each window's per-channel attributions (``attribution_<channel>``);
            not saved with the model, so that ``predict --model.explain true`` applies to any checkpoint.
        task: ``forecasting``, ``regression`` or ``classification``; linked from the data.
        input_size: features per observed step; linked from the data.
        target_dim: forecast channels; linked from the data.
        observe: observed steps; linked from the data.
        predict: predicted steps; linked from the data.
        num_classes: classes (classification); linked from the data.
        class_names: class names in index order; linked from the data.
        target_names: forecast channel names or the target column; linked from the data.
        categories: codes per categorical channel (embedded; the last ``inputs`` columns); linked from the data.
        known_size: future-known covariates read by the decoder per future step; linked from the data.
    """

    #: ``explain`` is given per command (``predict --model.explain true``); a checkpoint's hyper-parameters would override it
    hparams_ignore = ("explain",)

    def __init__(
        self,
        architecture: Literal["rnn", "cvae", "mixture", "transformer"] = "rnn",
        cell: Literal["lstm", "gru"] = "lstm",
        hidden_size: int = 64,
        embed_size: int = 32,
        num_layers: int = 1,
        dropout: float = 0.0,
        latent_size: int = 16,
        kl_weight: float = 1.0,
        num_samples: int = 20,
        modes: int = 20,
        wta_epsilon: float = 0.05,
        num_heads: int = 4,
        patch_length: int = 2,
        teacher_forcing: float = 0.5,
        teacher_forcing_epochs: int = 5,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        lr_schedule: str = "cosine",
        plot_samples: int = 6,
        velocity_residual: bool = True,
        batches_per_step: int = 1,
        cpu_threads: int | None = 1,
        quantiles: list[float] | float | None = None,  # a single number is parsed, then refused by check_quantiles with its own message
        calibrate: bool = True,
        explain: bool = False,
        task: str = "forecasting",
        input_size: int = 2,
        target_dim: int = 2,
        observe: int = 8,
        predict: int = 12,
        num_classes: int = 0,
        class_names: list[str] | None = None,
        target_names: list[str] | None = None,
        categories: list[int] | None = None,
        known_size: int = 0,
    ) -> None:
        if task not in ("forecasting", "regression", "classification"):
            raise ValueError(f"task must be forecasting, regression or classification, got {task!r}")
        if architecture in ("cvae", "mixture") and task != "forecasting":
            raise ValueError(f"architecture {architecture!r} forecasts; task {task!r} needs 'rnn' or 'transformer'")
        if task == "classification" and num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got num_classes={num_classes}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.quantile_levels = check_model_options(quantiles, architecture, task, categories, known_size)
        check_batches_per_step(batches_per_step)
        super().__init__()
        self.explain = bool(explain)  # a switch of this command, not of the model: kept out of the checkpoint's hyper-parameters
        self._plot_items: list[dict[str, torch.Tensor]] = []
        self._plot_sequences: set[str] = set()
        self._scatter: list[torch.Tensor] = []

    def explanation_writer(self, predictions: Any) -> AttributionColumns:
        """``predict --explain``: per-channel attributions as columns of the predictions file."""
        return AttributionColumns()

    @property
    def stochastic(self) -> bool:
        return self.hparams.architecture in ("cvae", "mixture")

    @property
    def point_index(self) -> int:
        """The output that is the point prediction: the median of a quantile model, else the only one."""
        return median_index(self.quantile_levels) if self.quantile_levels else 0

    def configure_models(self) -> None:
        """The network of ``architecture`` and the task (:func:`domains.autonomous.network_choice.make_network`)."""
        self.network: nn.Module = make_network(self.hparams, max(len(self.quantile_levels), 1), self.point_index)

    def configure_metrics(self) -> None:
        task = self.hparams.task
        if task == "forecasting":
            metrics: dict[str, Any] = {"ade": DisplacementError(), "fde": DisplacementError(final=True),
                                       "rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError()}  # fmt: skip
            if self.stochastic:
                metrics |= {"min_ade": DisplacementError(), "min_fde": DisplacementError(final=True)}
            self.score_key = "min_ade" if self.stochastic else "ade"
            self.test_steps = StepDisplacementError(self.hparams.predict)
        elif task == "regression":
            metrics = {"rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError()}
            self.score_key = "rmse"
        else:
            n = self.hparams.num_classes
            metrics = {"accuracy": Accuracy(task="multiclass", num_classes=n), "f1": F1Score(task="multiclass", num_classes=n, average="macro")}
            self.score_key = "accuracy"
            self.test_confusion = ConfusionMatrix(task="multiclass", num_classes=n)
            self.calibration = ClassifierCalibration(binary=False, calibrate=bool(self.hparams.calibrate))
        if self.quantile_levels:
            self.test_coverage = QuantileCoverage(self.quantile_levels, steps=self.hparams.predict if task == "forecasting" else 0)
        self.test_attribution = VectorMean(self.hparams.input_size)  # mean attribution per channel
        collection = MetricCollection(metrics)
        self.val_metrics = collection.clone(prefix="val/")
        self.test_metrics = collection.clone(prefix="test/")
        self.evaluation_means = EvaluationMeans(["val/loss", "test/loss"])  # exact over every process's samples

    # ----- forward passes --------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised future displacements ``(B, 1, predict, D)`` (forecasting; ``known``: the future-known
        covariates ``(B, predict, K)``) or outputs ``(B, outputs)``."""
        if self.hparams.task != "forecasting":
            return self.network(inputs)
        covariates = {"known": known} if known is not None else {}
        out = self.network(inputs, mean=True, **covariates) if self.stochastic else self.network(inputs, **covariates)
        return out + self._last_step(inputs)[:, None, None]

    def _last_step(self, inputs: torch.Tensor) -> torch.Tensor:
        """The constant-velocity prior ``(B, D)``: the last observed normalised displacement (zeros when off)."""
        last = inputs[:, -1, : self.hparams.target_dim]
        return last if self.hparams.velocity_residual else torch.zeros_like(last)

    @property
    def teacher_forcing_ratio(self) -> float:
        hp = self.hparams
        if hp.teacher_forcing_epochs <= 0:
            return 0.0
        return float(hp.teacher_forcing) * max(0.0, 1.0 - self.current_epoch / hp.teacher_forcing_epochs)

    @staticmethod
    def _true_steps(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """True future displacements, normalised ``(B, predict, D)``."""
        path = torch.cat([batch["past"][:, -1:], batch["future"]], 1)
        steps = torch.diff(path, dim=1) / batch["displacement_scale"][:, None, None]
        return steps @ batch["frame"] if "frame" in batch else steps  # into the window's heading frame

    @staticmethod
    def _positions(steps: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised displacements ``(B, K, T, D)`` (in the heading frame, if any) -> positions in data units."""
        if "frame" in batch:
            steps = steps @ batch["frame"].transpose(1, 2)[:, None]
        scale = batch["displacement_scale"][:, None, None, None]
        return batch["past"][:, -1][:, None, None] + torch.cumsum(steps * scale, 2)

    def _forecast_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        last = self._last_step(batch["inputs"])[:, None]
        truth = self._true_steps(batch) - last  # what the network predicts (residual to constant velocity)
        tf = self.teacher_forcing_ratio
        known = {"known": batch["known"]} if "known" in batch else {}
        if self.hparams.architecture == "mixture":
            means, logits = self.network.mixture(batch["inputs"], **known)
            errors = (means.cumsum(2) - truth.cumsum(1)[:, None]).pow(2).mean((2, 3))  # (B, M)
            best = errors.argmin(1)
            eps = self.hparams.wta_epsilon if means.shape[1] > 1 else 0.0
            winner = errors.gather(1, best[:, None])[:, 0]
            others = (errors.sum(1) - winner) / max(means.shape[1] - 1, 1)
            return ((1 - eps) * winner + eps * others).mean() + F.cross_entropy(logits, best)
        if self.stochastic:
            recon, kl = self.network.training_forward(batch["inputs"], truth, tf, **known, **evaluation_draws(self, batch, "loss"))
            return F.mse_loss(recon[:, 0].cumsum(1), truth.cumsum(1)) + self.hparams.kl_weight * kl.mean()
        if self.hparams.architecture == "rnn":
            pred = self.network(batch["inputs"], truth=truth, teacher_forcing=tf, **known)
        else:
            pred = self.network(batch["inputs"])
        if self.quantile_levels:  # the quantiles of each future position (relative to the last observed one)
            return pinball_loss(pred.cumsum(2), truth.cumsum(1), self.quantile_levels, dim=1)
        return F.mse_loss(pred[:, 0].cumsum(1), truth.cumsum(1))

    def _outputs_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.network(batch["inputs"])
        if self.hparams.task == "regression":
            normalised = (batch["target"] - batch["target_mean"]) / batch["target_std"]
            if self.quantile_levels:
                return pinball_loss(out, normalised, self.quantile_levels, dim=1), out
            return F.mse_loss(out[:, 0], normalised), out
        return F.cross_entropy(out, batch["label"]), out

    @grouped_training_step
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.hparams.task == "forecasting":
            loss = self._forecast_loss(batch)
        else:
            loss, _ = self._outputs_loss(batch)
        self.log_train_loss(loss, len(batch["inputs"]))
        return loss

    def on_train_epoch_start(self) -> None:
        if self.hparams.task == "forecasting" and self.hparams.architecture in ("rnn", "cvae"):
            self.log("train/teacher_forcing", self.teacher_forcing_ratio, on_epoch=True, on_step=False)

    def _predictions(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forecasting: ``single`` (B, T, D), for quantile models ``quantiles`` (B, Q, T, D, sorted: no crossing) and,
        for the CVAE and the mixture, ``samples`` (B, K, T, D) positions in data units."""
        positions = self._positions(self(batch["inputs"], batch.get("known")), batch)
        if self.quantile_levels:
            positions = positions.sort(1).values
        out = {"single": positions[:, self.point_index]} | ({"quantiles": positions} if self.quantile_levels else {})
        if self.stochastic:
            known = {"known": batch["known"]} if "known" in batch else {}
            draws = evaluation_draws(self, batch, "futures")  # per window: the metrics are a function of the data alone
            samples = self.network(batch["inputs"], num_samples=self.hparams.num_samples, **known, **draws) + self._last_step(batch["inputs"])[:, None, None]
            out["samples"] = self._positions(samples, batch)
        return out

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, metrics: MetricCollection) -> None:
        n = len(batch["inputs"])
        if self.hparams.task == "forecasting":
            loss = self._forecast_loss(batch)
            pred = self._predictions(batch)
            future = batch["future"]
            for name, metric in metrics.items(keep_base=False, copy_state=False):
                key = name.split("/")[-1]
                if key in ("ade", "fde"):
                    metric.update(pred["single"], future)
                elif key in ("min_ade", "min_fde"):
                    metric.update(pred["samples"], future)
                else:
                    metric.update(pred["single"].flatten(), future.flatten())
            if stage == "test":
                keep_for_plot(self, batch, pred)
                self.test_steps.update(pred["single"], future)
                if self.quantile_levels:
                    self.test_coverage.update(pred["quantiles"], future)
        else:
            loss, out = self._outputs_loss(batch)
            if self.hparams.task == "regression":
                values = self.regression_values(out, batch["target_mean"], batch["target_std"])
                value = values[:, self.point_index]
                metrics.update(value, batch["target"])
                if stage == "test":
                    self._scatter.append(torch.cat([batch["target"][:, None], value[:, None], values], 1).detach().cpu())
                    if self.quantile_levels:
                        self.test_coverage.update(values, batch["target"])
            else:
                metrics.update(out.softmax(-1), batch["label"])
                self.calibration.update(stage, out, batch["label"])
                if stage == "test":
                    self.test_confusion.update(out.argmax(-1), batch["label"])
        if stage == "test":
            self.test_attribution.update(occlusion(self, batch))
        self.evaluation_means.log(self, f"{stage}/loss", loss, n)  # every loss here is a mean over the batch's samples

    def regression_values(self, out: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float) -> torch.Tensor:
        """Regression outputs ``(B, Q)`` in the target's units (quantiles sorted: no crossing)."""
        values = out * torch.as_tensor(std, dtype=out.dtype, device=out.device).reshape(-1, 1) + torch.as_tensor(mean, dtype=out.dtype, device=out.device).reshape(-1, 1)
        return values.sort(1).values if values.shape[1] > 1 else values

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def _log_metrics(self, metrics: MetricCollection, stage: str) -> None:
        values = metrics.compute()
        score = values[f"{stage}/{self.score_key}"]
        values[f"{stage}/score"] = 1.0 - score if self.hparams.task == "classification" else score
        # the metrics are already synchronised across processes; sync_dist averages identical values
        self.log_dict(values, sync_dist=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")
        if self.hparams.task == "classification":
            fitted = {} if self.trainer.sanity_checking else self.calibration.fit()  # a few sanity batches fit nothing
            self.calibration.collect("val")  # (empty after fit) the sanity check's logits are dropped
            self.log_dict({k: float(v) for k, v in fitted.items()}, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")
        log_test_outputs(self)  # per-step errors, coverage, attributions, calibration and the plots
        self._plot_items, self._plot_sequences, self._scatter = [], set(), []

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """The columns of ``predictions.csv`` (:func:`domains.autonomous.prediction_columns.prediction_columns`)."""
        from domains.autonomous.prediction_columns import prediction_columns

        return prediction_columns(self, batch)

    def export_spec(self, datamodule_state: dict[str, Any] | None) -> ExportSpec:
        """Raw ``past`` positions and ``channels`` -> forecast positions / value / class probabilities
        (:func:`domains.autonomous.exporting.export_spec`)."""
        from domains.autonomous.exporting import export_spec

        return export_spec(self, datamodule_state)
