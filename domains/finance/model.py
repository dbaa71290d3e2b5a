"""``FraudAutoencoder``: anomaly detection on transactions with a dense AE or a VAE.

Training minimises the reconstruction negative log-likelihood (plus ``kl_weight`` x KL for the
VAE) on the rows the mode allows (normal rows when semi-supervised). The anomaly score is the
deterministic per-row negative log-likelihood (the negative ELBO for the VAE), split into
per-column contributions so an analyst sees why a row was flagged.

Thresholds are calibrated on the validation split at the end of every validation epoch and saved
as buffers, so every checkpoint carries the threshold that goes with its weights:

- ``budget_threshold``: flags the top ``target_alert_rate`` share of the validation rows labelled normal
  (all of them without labels; what it was fitted on is saved as ``alert_budget``: :func:`~domains.finance.thresholds.fit_budget`);
- ``threshold`` (used for ``is_alert``): the best-F1 threshold when the validation rows are labelled
  (``threshold_method`` ``auto`` or ``best_f1``), else the budget threshold.

Metrics (torchmetrics): AUROC, average precision (AUPRC), precision and recall at the alert
budget, and precision/recall/F1/alert rate at ``threshold``. At test time a histogram of scores for
normal vs fraud and a PR curve are saved in the run folder and logged to W&B.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
    binary_precision,
    binary_recall,
)

from domains.finance.figures import pr_curve, score_histogram, unit_interval
from domains.finance.intervals import labelled_metric_intervals
from domains.finance.networks import RowErrors, TabularAutoencoder, group_matrix, score_rows
from domains.finance.thresholds import best_f1_threshold, budget_threshold, fit_budget  # noqa: F401 - budget_threshold: importable from here
from pipelines.calibration import PlattScaling, brier_score, check_threshold_options, expected_calibration_error, operating_threshold
from pipelines.evaluation_plots import reliability_figure
from pipelines.errors import InputError
from pipelines.export_spec import ExportSpec
from pipelines.guards import NonFiniteLossError
from pipelines.monitor_budget import KEY as ALERT_BUDGET_KEY
from pipelines.grouped_steps import GroupedSteps, check_batches_per_step, grouped_training_step
from pipelines.task import BaseTask
from pipelines.tracking import log_figure


def check_options(**options: float) -> None:
    """Refuse option values that would train nothing or diverge, naming the option (``--model.X``).

    Example:
        >>> check_options(lr=1e6)
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: --model.lr 1000000.0: expected 0 < lr <= 1 (AdamW's learning rate; the domain's default is 0.002)
    """
    rules = {
        "lr": (lambda v: 0 < v <= 1, "0 < lr <= 1 (AdamW's learning rate; the domain's default is 0.002)"),
        "weight_decay": (lambda v: 0 <= v <= 1, "0 <= weight_decay <= 1"),
        "dropout": (lambda v: 0 <= v < 1, "0 <= dropout < 1"),
        "kl_weight": (lambda v: 0 <= v <= 1e3, "0 <= kl_weight <= 1000"),
        "target_alert_rate": (lambda v: 0 < v < 1, "0 < target_alert_rate < 1 (the share of transactions alerted, e.g. 0.005)"),
        "top_features": (lambda v: v >= 0, "top_features >= 0"),
    }
    for name, value in options.items():
        ok, expected = rules[name]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise InputError(f"--model.{name} {value}: expected {expected}")


class FraudAutoencoder(GroupedSteps, BaseTask):
    """Score transactions by how badly an autoencoder reconstructs them.

    Args:
        architecture: ``autoencoder`` (dense) or ``vae`` (variational; score = negative ELBO).
        hidden_dims: widths of the encoder's hidden layers (the decoder mirrors them); default ``[64, 32]``.
        latent_dim: size of the code.
        embedding_dim: embedding width per categorical (with ``categorical_encoding: embedding``).
        dropout: dropout after each hidden layer.
        kl_weight: weight of the KL term in the VAE's training loss (beta); the score always uses 1.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``cosine``, ``step`` or ``constant``.
        threshold_method: ``auto`` (best F1 when validation labels exist, else the alert budget),
            ``best_f1``, ``alert_rate``, ``cost`` (least ``cost_fn`` x missed frauds + ``cost_fp`` x false
            alerts on validation), ``sensitivity`` or ``specificity`` (reach ``threshold_target`` on
            validation); the last three need validation labels (else the alert budget, with a warning).
        threshold_target: the recall (sensitivity) or specificity wanted (``threshold_method`` ``sensitivity``/``specificity``).
        cost_fn: cost of one missed fraud (``threshold_method: cost``).
        cost_fp: cost of one false alert (``threshold_method: cost``).
        target_alert_rate: the alert budget: share of transactions flagged (e.g. 0.005 = 0.5 %).
        top_features: contributing columns reported per scored row.
        batches_per_step: mini-batches per Lightning step, one optimizer step each, same numerics (:mod:`pipelines.grouped_steps`).
        cpu_threads: torch intra-op threads while the model runs on CPU (restored afterwards; see BaseTask).
            These networks are small: one thread is as fast as several on an idle machine and far faster
            on a busy one, where spinning worker threads starve. ``null`` keeps torch's default.
        num_numeric: numeric input features; linked from the data.
        categorical_cardinalities: vocabulary sizes of embedded categoricals; linked from the data.
        feature_groups: names of the source columns contributions are reported for; linked from the data.
        numeric_feature_groups: group index of each numeric feature; linked from the data.
        categorical_feature_groups: group index of each embedded categorical; linked from the data.
    """

    def __init__(
        self,
        architecture: Literal["autoencoder", "vae"] = "autoencoder",
        hidden_dims: list[int] | None = None,
        latent_dim: int = 8,
        embedding_dim: int = 4,
        dropout: float = 0.0,
        kl_weight: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: str = "cosine",
        threshold_method: Literal["auto", "best_f1", "alert_rate", "cost", "sensitivity", "specificity"] = "auto",
        target_alert_rate: float = 0.005,
        threshold_target: float = 0.9,
        cost_fn: float = 100.0,
        cost_fp: float = 1.0,
        top_features: int = 3,
        batches_per_step: int = 1,
        cpu_threads: int | None = 1,
        num_numeric: int = 1,
        categorical_cardinalities: list[int] | None = None,
        feature_groups: list[str] | None = None,
        numeric_feature_groups: list[int] | None = None,
        categorical_feature_groups: list[int] | None = None,
    ) -> None:
        check_options(lr=lr, weight_decay=weight_decay, dropout=dropout, kl_weight=kl_weight, target_alert_rate=target_alert_rate, top_features=top_features)
        groups = feature_groups or [f"f{i}" for i in range(num_numeric)]
        numeric_groups = numeric_feature_groups if numeric_feature_groups is not None else list(range(num_numeric))
        if len(numeric_groups) != num_numeric or any(not 0 <= g < len(groups) for g in numeric_groups):
            raise InputError(f"numeric_feature_groups must give a group in [0, {len(groups)}) for each of the {num_numeric} numeric features")
        check_batches_per_step(batches_per_step)
        check_threshold_options(threshold_method if threshold_method in ("cost", "sensitivity", "specificity") else "fixed", threshold_target, cost_fn, cost_fp)
        super().__init__()
        self._warned_no_labels = False
        self.alert_budget: dict[str, Any] | None = None  # what budget_threshold was fitted on (saved in the checkpoint)
        self._out_of_range_rows = 0

    @property
    def group_names(self) -> list[str]:
        return list(self.hparams.feature_groups or [f"f{i}" for i in range(self.hparams.num_numeric)])

    def configure_models(self) -> None:
        hp = self.hparams
        self.network = TabularAutoencoder(
            num_numeric=hp.num_numeric,
            categorical_cardinalities=list(hp.categorical_cardinalities or []),
            hidden_dims=list(hp.hidden_dims or [64, 32]),
            latent_dim=hp.latent_dim,
            embedding_dim=hp.embedding_dim,
            dropout=hp.dropout,
            variational=hp.architecture == "vae",
        )
        numeric_groups = hp.numeric_feature_groups if hp.numeric_feature_groups is not None else list(range(hp.num_numeric))
        num_groups = len(self.group_names)
        self.register_buffer("numeric_groups", group_matrix(numeric_groups, num_groups), persistent=False)
        self.register_buffer("categorical_groups", group_matrix(list(hp.categorical_feature_groups or []), num_groups), persistent=False)
        # calibrated on validation; saved in every checkpoint
        self.register_buffer("threshold", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("budget_threshold", torch.tensor(float("nan"), dtype=torch.float64))
        self.probability = PlattScaling()  # score -> fraud probability, fitted on labelled validation rows

    def configure_metrics(self) -> None:
        # nan_strategy "disable": a NaN score must reach the checks below (the default drops it silently,
        # which misaligns scores and labels and, when every score is NaN, leaves an empty list)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_scores", CatMetric(nan_strategy="disable"))
            setattr(self, f"{stage}_labels", CatMetric(nan_strategy="disable"))
            setattr(self, f"{stage}_loss", MeanMetric(nan_strategy="disable"))

    # ----- scoring -----------------------------------------------------------------------------
    def errors(self, batch: dict[str, Any], sample: bool = False) -> RowErrors:
        return self.network.errors(batch["numeric"], batch["categorical"], sample=sample)

    def score(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly score per row and its per-column contributions (the VAE's KL is in the score only).

        Deterministic (the posterior mean is the code) and computed by :func:`~domains.finance.networks.score_rows`,
        the function the exported :class:`~domains.finance.networks.FraudScorer` runs too.
        """
        categorical = batch["categorical"] if self.network.cardinalities else None
        return score_rows(self.network, batch["numeric"], categorical, self.numeric_groups, self.categorical_groups)


    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        return self.network(numeric, categorical)

    @grouped_training_step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        errors = self.errors(batch, sample=True)
        loss = (errors.numeric.sum(1) + errors.categorical.sum(1) + self.hparams.kl_weight * errors.kl).mean()
        self.log_train_loss(loss, len(errors.kl))
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        scores, _ = self.score(batch)
        getattr(self, f"{stage}_scores").update(scores.double())
        getattr(self, f"{stage}_labels").update(batch["label"].float())
        fit_rows = batch["fit_row"]
        if fit_rows.any():
            getattr(self, f"{stage}_loss").update(scores[fit_rows])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _collect(self, stage: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        metrics = [getattr(self, f"{stage}_{name}") for name in ("scores", "labels", "loss")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty CatMetric warns; handled below
            scores, labels, loss = (m.compute() for m in metrics)
        for metric in metrics:
            metric.reset()
        scores, labels = (torch.atleast_1d(v) if isinstance(v, torch.Tensor) else torch.zeros(0, device=self.device) for v in (scores, labels))
        return scores.double(), labels, loss

    @staticmethod
    def _labelled(labels: torch.Tensor) -> bool:
        return len(labels) > 0 and bool((labels >= 0).all()) and 0 < int(labels.sum()) < len(labels)

    def _calibrate(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        hp = self.hparams
        budget, self.alert_budget = fit_budget(scores, labels if self._labelled(labels) else None, hp.target_alert_rate)
        chosen = budget
        if hp.threshold_method != "alert_rate":
            if self._labelled(labels) and hp.threshold_method in ("cost", "sensitivity", "specificity"):
                chosen = operating_threshold(scores, labels, hp.threshold_method, hp.threshold_target, hp.cost_fn, hp.cost_fp)
            elif self._labelled(labels):
                chosen, _ = best_f1_threshold(scores, labels)
            elif hp.threshold_method != "auto" and not self._warned_no_labels:
                self._warned_no_labels = True
                warnings.warn(f"threshold_method {hp.threshold_method} needs both classes in the validation labels; using the alert budget instead")
        if self._labelled(labels):
            self.probability.fit(scores, labels)
        self.budget_threshold.fill_(budget)
        self.threshold.fill_(chosen)

    def _ranking_metrics(self, stage: str, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        target = labels.long()
        at_budget = (scores >= self.budget_threshold).long()
        flagged = (scores >= self.threshold).long()
        return {
            f"{stage}/auroc": binary_auroc(unit_interval(scores), target),
            f"{stage}/auprc": binary_average_precision(unit_interval(scores), target),
            f"{stage}/precision_at_budget": binary_precision(at_budget, target),
            f"{stage}/recall_at_budget": binary_recall(at_budget, target),
            f"{stage}/precision": binary_precision(flagged, target),
            f"{stage}/recall": binary_recall(flagged, target),
            f"{stage}/f1": binary_f1_score(flagged, target),
        }

    def on_validation_epoch_end(self) -> None:
        scores, labels, loss = self._collect("val")
        if len(scores) == 0 or self.trainer.sanity_checking:
            return  # Lightning's sanity check scores untrained weights: no threshold or probability may be fitted on them
        if not bool(torch.isfinite(scores).all()):  # no threshold may be calibrated on them, no checkpoint kept
            bad = int((~torch.isfinite(scores)).sum())
            raise NonFiniteLossError(
                f"{bad} of {len(scores)} validation anomaly scores are NaN or inf: the weights diverged "
                f"(--model.lr {self.hparams.lr} too high?); no threshold was calibrated on them"
            )
        self._calibrate(scores, labels)
        metrics = {"val/loss": loss, "val/threshold": self.threshold.float()}
        if self._labelled(labels):
            metrics.update(self._ranking_metrics("val", scores, labels))
        self.log_dict({k: v.float() for k, v in metrics.items()}, sync_dist=True)  # identical on every rank (synced metrics)

    def on_test_epoch_end(self) -> None:
        scores, labels, loss = self._collect("test")
        if len(scores) == 0:
            return
        metrics = {"test/loss": loss, "test/alert_rate": (scores >= self.threshold).double().mean()}
        if not bool(torch.isfinite(scores).all()):  # a NaN test/loss fails the command (the runner's check)
            warnings.warn(f"{int((~torch.isfinite(scores)).sum())} test anomaly scores are NaN or inf: the checkpoint's weights are not finite")
            self.log_dict({"test/loss": torch.tensor(float("nan"), device=self.device)}, sync_dist=True)
            return
        labelled = self._labelled(labels)
        if labelled:
            metrics.update(self._ranking_metrics("test", scores, labels))
            metrics.update(self._probability_metrics(scores, labels))
            probability = self.probability if self.probability.fitted else None
            self.metric_intervals = labelled_metric_intervals(scores, labels, float(self.threshold), float(self.budget_threshold), probability)
        self.log_dict({k: torch.as_tensor(v).float() for k, v in metrics.items()}, sync_dist=True)  # identical on every rank (synced metrics)
        if self.trainer.is_global_zero and labelled and self.probability.fitted:
            log_figure(self.trainer, reliability_figure({"Platt scaling": self.probability(scores).cpu()}, labels.cpu(), "Fraud probability reliability, test"), "test/reliability_diagram")
        if self.trainer.is_global_zero:
            log_figure(self.trainer, score_histogram(scores, labels if labelled else None, self._thresholds()), "test/score_histogram")
            if labelled:
                log_figure(self.trainer, pr_curve(scores, labels, self._thresholds()), "test/pr_curve")

    def _probability_metrics(self, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """ECE and Brier of the fraud probability (when a Platt mapping was fitted on validation)."""
        if not self.probability.fitted:
            return {}
        probs = self.probability(scores).cpu()
        return {"test/ece": expected_calibration_error(probs, labels.cpu()), "test/brier": brier_score(probs, labels.cpu())}

    def _thresholds(self) -> dict[str, float]:
        return {"threshold": float(self.threshold), "alert budget": float(self.budget_threshold)}

    # ----- scoring new rows --------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Every input row (original values) plus ``score``, ``is_alert``, ``out_of_range``, the top contributing
        columns and, for the VAE, ``latent_contribution`` (the score's KL part, so the contributions and it sum to the score).

        ``is_alert``: ``score >= threshold``, or a value outside the range seen in training
        (``out_of_range`` names those columns; such a value is scored compressed, see the preprocessing);
        empty (no decision) when the model has no calibrated threshold.
        A NaN or infinite score stops the command (exit 1): it would otherwise read as "no alert".
        """
        scores, contributions = self.score(batch)
        finite = torch.isfinite(scores)
        if not bool(finite.all()):
            rows = (batch["row"][~finite.cpu()] + 1).tolist()[:5]
            raise RuntimeError(f"the model's anomaly score is NaN or inf for data row(s) {rows}: the checkpoint's weights are not finite; no predictions were written")
        raw = batch.get("raw")
        columns: dict[str, Any] = {str(c): raw[c].to_numpy() for c in raw.columns} if raw is not None else {}
        columns["source_row"] = batch["row"]
        columns["score"] = scores
        if self.probability.fitted:  # the Platt mapping fitted on labelled validation rows (as the server's fraud_probability)
            columns["fraud_probability"] = self.probability(scores)
        outside = batch["out_of_range"].cpu().numpy() if "out_of_range" in batch else np.zeros((len(scores), 0), dtype=bool)
        names = self.range_columns
        if torch.isfinite(self.threshold):
            columns["is_alert"] = (scores.double() >= self.threshold).cpu().numpy() | outside.any(axis=1)
        else:  # no calibrated threshold: no decision (empty), never a silent "no alert"; out-of-range rows still alert
            columns["is_alert"] = [True if flagged else None for flagged in outside.any(axis=1)]
        columns["out_of_range"] = [";".join(names[j] for j in np.flatnonzero(row)) for row in outside]
        self._out_of_range_rows += int(outside.any(axis=1).sum())
        names = self.group_names
        k = min(self.hparams.top_features, len(names))
        if k:
            values, index = contributions.topk(k, dim=1)
            for j in range(k):
                columns[f"top_feature_{j + 1}"] = [names[i] for i in index[:, j].tolist()]
                columns[f"top_contribution_{j + 1}"] = values[:, j]
        if self.network.variational:  # the rest of the VAE's score: how unusual the row's code is (KL), no one column's
            columns["latent_contribution"] = (scores - contributions.sum(1)).clamp_min(0)
        return columns

    @property
    def range_columns(self) -> list[str]:
        """The columns ``out_of_range`` names (the data's numeric and amount columns, in order)."""
        try:
            datamodule = self.trainer.datamodule
        except RuntimeError:  # not attached to a Trainer (a model built outside a run)
            datamodule = None
        return list(datamodule.fitted.range_columns) if datamodule is not None and hasattr(datamodule, "fitted") else []

    def on_predict_start(self) -> None:
        self._out_of_range_rows = 0
        if not torch.isfinite(self.threshold):
            warnings.warn(
                "the model has no calibrated threshold (its weights never went through validation): is_alert is left empty "
                "(no decision) except for out-of-range rows; score with a trained checkpoint: --run_id RUN --ckpt_path best"
            )

    def on_predict_end(self) -> None:
        if self._out_of_range_rows and self.trainer.is_global_zero:
            rank_zero_info(
                f"[finance] predict: {self._out_of_range_rows} row(s) hold values outside the range seen in training: "
                "alerted, with the columns named in out_of_range"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.alert_budget is not None:
            checkpoint[ALERT_BUDGET_KEY] = self.alert_budget

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with the reason, a checkpoint whose input layout differs from this data's."""
        self.alert_budget = checkpoint.get(ALERT_BUDGET_KEY)
        saved = checkpoint.get("hyper_parameters", {})
        for key in ("architecture", "num_numeric", "categorical_cardinalities", "feature_groups", "hidden_dims", "latent_dim"):
            if key in saved:
                theirs, ours = saved[key], self.hparams.get(key)
                if (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != (list(ours) if isinstance(ours, (list, tuple)) else ours):
                    raise ValueError(
                        f"the checkpoint was trained with {key}={theirs!r} but this run has {key}={ours!r}; "
                        "use the data source, column roles and model options the checkpoint was trained with"
                    )

    # ----- export ------------------------------------------------------------------------------
    def export_spec(self, datamodule_state: dict[str, Any] | None) -> ExportSpec:
        """Preprocessed rows -> ``score``, ``is_alert`` and per-column ``contributions`` (:func:`domains.finance.exporting.export_spec`)."""
        from domains.finance.exporting import export_spec

        return export_spec(self, datamodule_state)
