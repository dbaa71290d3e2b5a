"""Calibration, operating point, reliability diagram and bootstrap intervals for a classifier task.

A task (binary or multi-class, one logit per class or one logit for binary) holds one
:class:`ClassifierCalibration` and calls it from its steps:

- ``probabilities(logits)``: calibrated probabilities (``(N,)`` P(positive) for binary, ``(N, C)``);
  ``decide(probs)``: class indices (binary: ``P(positive) >= threshold``; multi-class: argmax);
- ``update("val"|"test", logits, targets)`` in the validation and test steps (DDP-synchronised);
- ``fit()`` at the end of each validation epoch: the temperature (when ``calibrate``) and the binary
  threshold (``threshold_method``) are fitted on the validation logits and kept as buffers, so each
  checkpoint carries the calibration of its own weights; returns ``val/temperature``,
  ``val/threshold``, ``val/ece``;
- ``evaluate_test(metric_values)`` at the end of ``test``: ECE and Brier (calibrated and not), the
  operating point's sensitivity and specificity (binary), the reliability diagram, and the bootstrap
  interval of these and of every metric ``metric_values(logits, targets)`` gives for a batch of
  resamples (it returns a function of a count matrix, :mod:`pipelines.weighted_metrics`).

The calibrated probability ``p`` and the threshold ``t`` are also what ``export`` bundles hold (the
temperature inside the graph, the threshold in ``metadata.json``), so predict and serve agree.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torchmetrics import CatMetric

from pipelines.bootstrap import bootstrap_count_intervals
from pipelines.calibration import (
    BINS,
    ProbabilityCalibration,
    ThresholdMethod,
    brier_score,
    check_threshold_options,
    confidence_correct,
    expected_calibration_error,
    fit_temperature,
    operating_threshold,
    probabilities,
    rates_at,
)
from pipelines.evaluation_plots import reliability_figure
from pipelines.weighted_metrics import calibration_error, rate, weighted_mean


def decision_centred(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """``P(positive)`` moved so that the decision threshold lands on 0.5, ranks unchanged:
    ``sigmoid(logit(p) - logit(t))``. Torchmetrics' binary accuracy/F1 (at 0.5) then measure the
    model at its operating point, and AUROC is unchanged."""
    t = min(max(float(threshold), 1e-7), 1 - 1e-7)
    return torch.sigmoid(torch.logit(probs.clamp(1e-7, 1 - 1e-7)) - math.log(t / (1 - t)))


class ClassifierCalibration(nn.Module):
    """Post-hoc calibration state and evaluation of one classifier (see the module docstring).

    Args:
        binary: one logit (positive class) instead of one per class.
        calibrate: fit a temperature on validation (otherwise it stays 1).
        threshold_method: binary decision threshold: ``fixed`` (0.5), ``sensitivity`` / ``specificity``
            (reach ``threshold_target`` on validation), ``cost`` (least ``cost_fn`` x missed +
            ``cost_fp`` x false alarms on validation).
        threshold_target: the sensitivity or specificity wanted.
        cost_fn: cost of one missed positive; cost_fp: cost of one false alarm.
    """

    def __init__(
        self, binary: bool, calibrate: bool = True, threshold_method: ThresholdMethod = "fixed", threshold_target: float = 0.9,
        cost_fn: float = 1.0, cost_fp: float = 1.0,
    ) -> None:
        check_threshold_options(threshold_method, threshold_target, cost_fn, cost_fp)
        if threshold_method != "fixed" and not binary:
            raise ValueError(f"--model.threshold_method {threshold_method}: operating thresholds apply to binary tasks; multi-class predictions are the most probable class")
        super().__init__()
        self.binary, self.calibrate = binary, calibrate
        self.method, self.target, self.cost_fn, self.cost_fp = threshold_method, threshold_target, cost_fn, cost_fp
        self.state = ProbabilityCalibration()  # buffers: in every checkpoint
        for stage in ("val", "test"):
            setattr(self, f"{stage}_logits", CatMetric(nan_strategy="disable"))
            setattr(self, f"{stage}_targets", CatMetric(nan_strategy="disable"))

    @property
    def temperature(self) -> float:
        return float(self.state.temperature)

    @property
    def threshold(self) -> float:
        return float(self.state.threshold)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return probabilities(logits, self.state.temperature)

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        return (probs >= self.state.threshold).long() if self.binary else probs.argmax(1)

    def update(self, stage: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.detach().float()
        getattr(self, f"{stage}_logits").update(logits.reshape(len(logits), -1))
        getattr(self, f"{stage}_targets").update(targets.detach().float())

    def collect(self, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All of the stage's logits ``(N, outputs)`` and targets ``(N,)`` (every process's), then reset."""
        metrics = getattr(self, f"{stage}_logits"), getattr(self, f"{stage}_targets")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty CatMetric warns
            logits, targets = (m.compute() if m.update_count else torch.zeros(0) for m in metrics)
        for metric in metrics:
            metric.reset()
        logits = logits.reshape(len(targets), -1) if len(targets) else torch.zeros(0, 1)
        return logits.float(), targets.long()

    def fit(self) -> dict[str, float]:
        """Fit the temperature and the threshold on this validation epoch's logits; the values to log."""
        logits, targets = self.collect("val")
        if len(targets) == 0 or not bool(torch.isfinite(logits).all()):
            return {}
        if self.calibrate:
            self.state.temperature.fill_(fit_temperature(logits, targets))
        probs = self.probabilities(logits)
        metrics = {"val/temperature": self.temperature, "val/ece": expected_calibration_error(probs, targets)}
        if self.binary:
            self.state.threshold.fill_(operating_threshold(probs, targets, self.method, self.target, self.cost_fn, self.cost_fp, default=0.5))
            metrics["val/threshold"] = self.threshold
        return metrics

    def evaluate_test(
        self, metric_values: Callable[[torch.Tensor, torch.Tensor], Callable[[np.ndarray], dict[str, np.ndarray]]] | None = None
    ) -> tuple[dict[str, float], dict[str, Figure], dict[str, dict[str, Any]]]:
        """Test metrics (ECE, Brier, operating point), the reliability diagram and bootstrap intervals of
        these and of the task's own test metrics: ``metric_values(logits, targets)`` returns their
        values for a batch of resamples, a function of a count matrix (:mod:`pipelines.weighted_metrics`)."""
        logits, targets = self.collect("test")
        if len(targets) == 0 or not bool(torch.isfinite(logits).all()):
            return {}, {}, {}
        raw = probabilities(logits)

        probs = self.probabilities(logits)
        metrics = {"test/ece": expected_calibration_error(probs, targets), "test/brier": brier_score(probs, targets), "test/ece_uncalibrated": expected_calibration_error(raw, targets)}
        if self.binary:
            rates = rates_at(probs, targets, self.threshold)
            metrics |= {"test/sensitivity": rates["sensitivity"], "test/specificity": rates["specificity"]}
        # a rate undefined on this test set (sensitivity without positives) is left out: a logged NaN means a broken model
        metrics = {name: value for name, value in metrics.items() if math.isfinite(value)}
        metrics["test/temperature"] = self.temperature
        if self.binary:
            metrics["test/threshold"] = self.threshold
        figure = reliability_figure({"uncalibrated": raw, f"calibrated (T = {self.temperature:.2f})": probs}, targets,
                                    title=f"Reliability diagram, test ({len(targets)} rows)")  # fmt: skip
        resampled = [self.resampled_values(logits, targets), *([metric_values(logits, targets)] if metric_values else [])]
        intervals = bootstrap_count_intervals(len(targets), lambda counts: {name: v for values in resampled for name, v in values(counts).items()})
        return metrics, {"test/reliability_diagram": figure}, intervals

    def resampled_values(self, logits: torch.Tensor, targets: torch.Tensor) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        """ECE and Brier (binary: sensitivity and specificity at the threshold too) of a batch of
        bootstrap resamples ``(b, rows)`` of these test rows, as :meth:`evaluate_test` logs them."""
        probs = self.probabilities(logits)
        confidence, correct = confidence_correct(probs, targets)
        if self.binary:
            squared = (probs.detach().double().cpu() - targets.detach().cpu().double()).pow(2).numpy()
        else:
            onehot = torch.nn.functional.one_hot(targets.long().cpu(), probs.shape[1]).double()
            squared = (probs.detach().double().cpu() - onehot).pow(2).sum(dim=1).numpy()
        positive = targets.detach().cpu().numpy().reshape(-1) == 1
        flagged = probs.detach().double().cpu().numpy().reshape(-1) >= self.threshold if self.binary else None

        def values(counts: np.ndarray) -> dict[str, np.ndarray]:
            out = {"test/ece": calibration_error(counts, confidence, correct, BINS), "test/brier": weighted_mean(counts, squared)}
            if flagged is not None:
                out |= {"test/sensitivity": rate(counts, flagged, positive, np.nan), "test/specificity": rate(counts, ~flagged, ~positive, np.nan)}
            return out

        return values
