"""Post-hoc calibration and operating points, shared by the classifiers and the fraud scorer.

- :func:`fit_temperature`: temperature scaling (Guo et al., 2017), one scalar ``T`` fitted on
  validation logits by minimising the negative log-likelihood; ``softmax(z / T)`` (``sigmoid(z / T)``
  for one binary logit) keeps every ranking and argmax, so AUROC and accuracy do not move.
- :func:`fit_platt`: Platt scaling, ``P(positive) = sigmoid(a * s + b)`` fitted on labelled scores
  (any real score: a reconstruction error, a log-likelihood).
- :func:`expected_calibration_error` and :func:`brier_score`: how far probabilities are from the
  frequencies they claim (15 equal-width bins; binary: the positive class's probability against the
  share of positives, multi-class: the top class's confidence against accuracy).
- :func:`operating_threshold`: the decision threshold on a score (flag ``score >= t``) chosen on
  validation for a target sensitivity, a target specificity, or the least expected cost
  ``cost_fn * missed + cost_fp * false alarms``.
- :class:`ProbabilityCalibration`: the fitted temperature and threshold as buffers, so they are in
  every checkpoint beside the weights they were fitted for; a checkpoint written before calibration
  existed loads as uncalibrated (temperature 1, threshold 0.5).

Example:
    >>> generator = torch.Generator().manual_seed(0)
    >>> z = 2 * torch.randn(20000, generator=generator)
    >>> labels = torch.bernoulli(torch.sigmoid(z), generator=generator)
    >>> round(fit_temperature(3 * z, labels))  # logits three times too confident
    3
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ThresholdMethod = Literal["fixed", "sensitivity", "specificity", "cost"]
THRESHOLD_METHODS = ("fixed", "sensitivity", "specificity", "cost")
BINS = 15
TEMPERATURE_RANGE = (0.05, 100.0)
"""The fitted temperature is kept in this range; one at a bound is named in ``report.html``'s limits (:func:`pipelines.report.limits`)."""

def _binary(logits: torch.Tensor) -> bool:
    return logits.ndim == 1 or logits.shape[1] == 1


def _with_autograd(fit: Callable[..., Any]) -> Callable[..., Any]:
    """Run a calibration fit with autograd on, also when it is called inside ``torch.inference_mode``
    (Lightning's ``validate`` and ``test``: the fit at validation end needs gradients of its own
    parameters; the tensors it is given are copied out of inference mode)."""

    @functools.wraps(fit)
    def fitted(values: torch.Tensor, labels: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.enable_grad():
            return fit(values.clone(), labels.clone(), *args, **kwargs)

    return fitted


@_with_autograd
def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature ``T`` minimising the NLL of ``logits / T`` on ``labels``.

    Args:
        logits: ``(N,)`` or ``(N, 1)`` binary logits, or ``(N, C)`` multi-class logits.
        labels: ``(N,)`` 0/1 for binary, class indices for multi-class.

    Returns ``1.0`` (no change) when there is nothing to fit on: no rows, one class only, or logits
    that are not finite. ``T`` is kept in :data:`TEMPERATURE_RANGE` (``[0.05, 100]``).
    """
    logits, labels = logits.detach().double().cpu(), labels.detach().cpu()
    binary = _binary(logits)
    if binary:
        logits = logits.reshape(-1)
    if len(logits) == 0 or labels.unique().numel() < 2 or not bool(torch.isfinite(logits).all()):
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = logits / log_t.exp()
        loss = F.binary_cross_entropy_with_logits(scaled, labels.double()) if binary else F.cross_entropy(scaled, labels.long())
        loss.backward()
        return loss

    optimizer.step(nll)
    temperature = float(log_t.detach().exp())
    return min(max(temperature, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1]) if math.isfinite(temperature) else 1.0


@_with_autograd
def fit_platt(scores: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> tuple[float, float]:
    """``(a, b)`` of ``P(positive | score s) = sigmoid(a * s + b)``, fitted by maximum likelihood on labelled
    scores (standardised while fitting, for a well-conditioned problem). ``(nan, nan)`` when the
    labels hold one class only or a score is not finite: no probability mapping can be fitted."""
    scores, labels = scores.detach().double().cpu().reshape(-1), labels.detach().double().cpu().reshape(-1)
    if len(scores) == 0 or labels.unique().numel() < 2 or not bool(torch.isfinite(scores).all()):
        return float("nan"), float("nan")
    mean, std = scores.mean(), scores.std().clamp_min(1e-12)
    standard = (scores - mean) / std
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(params[0] * standard + params[1], labels) + 1e-6 * params.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(nll)
    slope, intercept = (float(v) for v in params.detach())
    return slope / float(std), intercept - slope * float(mean) / float(std)


def probabilities(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Calibrated probabilities: ``sigmoid(z / T)`` for ``(N,)``/``(N, 1)`` binary logits (``(N,)`` out), else ``softmax(z / T)``."""
    if _binary(logits):
        return torch.sigmoid(logits.reshape(-1) / temperature)
    return torch.softmax(logits / temperature, dim=1)


def confidence_correct(probs: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row, what a reliability diagram compares: binary ``P(positive)`` and the 0/1 label;
    multi-class the top probability and whether its class is the label."""
    probs, labels = probs.detach().double().cpu(), labels.detach().cpu()
    if probs.ndim == 1:  # binary: P(positive) against the share of positives
        return probs.numpy(), labels.double().numpy()
    confidence, predicted = probs.max(dim=1)
    return confidence.numpy(), (predicted == labels.long()).double().numpy()


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of predicted probability: ``confidence`` (mean predicted), ``frequency``
    (observed share of positives, or accuracy for multi-class) and ``count``; empty bins are NaN/0."""
    confidence, correct = confidence_correct(probs, labels)
    index = np.clip((confidence * bins).astype(int), 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, bins) / count
        frequency = np.bincount(index, correct, bins) / count
    return {"confidence": mean_confidence, "frequency": frequency, "count": count, "edges": np.linspace(0, 1, bins + 1)}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """ECE: the count-weighted mean gap between predicted probability and observed frequency per bin (0 = calibrated)."""
    table = reliability_bins(probs, labels, bins)
    filled = table["count"] > 0
    if not filled.any():
        return float("nan")
    gaps = np.abs(table["confidence"][filled] - table["frequency"][filled])
    return float((gaps * table["count"][filled]).sum() / table["count"].sum())


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean squared error of the probabilities against the one-hot labels (binary: of P(positive) against 0/1)."""
    probs, labels = probs.detach().double().cpu(), labels.detach().cpu()
    if len(probs) == 0:
        return float("nan")
    if probs.ndim == 1:
        return float((probs - labels.double()).pow(2).mean())
    onehot = F.one_hot(labels.long(), probs.shape[1]).double()
    return float((probs - onehot).pow(2).sum(dim=1).mean())


def operating_threshold(
    scores: torch.Tensor, labels: torch.Tensor, method: ThresholdMethod, target: float = 0.9, cost_fn: float = 1.0, cost_fp: float = 1.0,
    default: float = 0.5,
) -> float:
    """The threshold ``t`` (flag ``score >= t``) chosen on labelled validation scores.

    Args:
        method: ``fixed`` (return ``default``); ``sensitivity``: the highest ``t`` whose sensitivity is
            at least ``target`` (the best specificity under that constraint); ``specificity``: the
            lowest ``t`` whose specificity is at least ``target``; ``cost``: the ``t`` with the least
            ``cost_fn * false negatives + cost_fp * false positives`` (ties: the highest such ``t``).
        target: the sensitivity or specificity wanted, in (0, 1].

    Only cuts between distinct scores are candidates (plus "flag nothing"); with one class only in
    ``labels`` the ``default`` is returned.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {method!r}")
    scores, labels = scores.detach().double().cpu().reshape(-1), labels.detach().cpu().reshape(-1).bool()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if method == "fixed" or positives == 0 or negatives == 0:
        return float(default)
    ordered, order = scores.sort(descending=True)
    hits = labels[order].double()
    true_pos, false_pos = hits.cumsum(0), (1 - hits).cumsum(0)  # flagging the first k rows
    last_of_tie = torch.ones_like(ordered, dtype=torch.bool)
    last_of_tie[:-1] = ordered[:-1] != ordered[1:]  # a cut can only fall between different scores
    candidates = torch.cat([torch.tensor([math.inf], dtype=torch.float64), ordered[last_of_tie]])
    true_pos = torch.cat([torch.zeros(1, dtype=torch.float64), true_pos[last_of_tie]])
    false_pos = torch.cat([torch.zeros(1, dtype=torch.float64), false_pos[last_of_tie]])
    sensitivity, specificity = true_pos / positives, 1 - false_pos / negatives
    if method == "cost":
        cost = cost_fn * (positives - true_pos) + cost_fp * false_pos
        best = int(torch.nonzero(cost == cost.min())[0])  # candidates run from high to low thresholds
    elif method == "sensitivity":
        best = int(torch.nonzero(sensitivity >= target - 1e-12)[0])
    else:
        best = int(torch.nonzero(specificity >= target - 1e-12)[-1])
    return float(candidates[best])


def rates_at(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity and the flagged share when flagging ``score >= threshold``."""
    flagged, labels = scores.detach().double().cpu().reshape(-1) >= threshold, labels.detach().cpu().reshape(-1).bool()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    return {
        "sensitivity": float((flagged & labels).sum()) / positives if positives else float("nan"),
        "specificity": float((~flagged & ~labels).sum()) / negatives if negatives else float("nan"),
        "flagged_rate": float(flagged.double().mean()) if len(flagged) else float("nan"),
    }


def check_threshold_options(method: str, target: float, cost_fn: float, cost_fp: float, prefix: str = "--model.") -> None:
    """Refuse operating-point options that choose nothing, naming the option."""
    from pipelines.errors import InputError

    if method not in THRESHOLD_METHODS:
        raise InputError(f"{prefix}threshold_method {method!r}: expected one of {', '.join(THRESHOLD_METHODS)}")
    if not (math.isfinite(target) and 0 < target <= 1):
        raise InputError(f"{prefix}threshold_target {target}: expected a sensitivity or specificity in (0, 1]")
    for name, value in (("cost_fn", cost_fn), ("cost_fp", cost_fp)):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"{prefix}{name} {value}: expected a cost >= 0 (the cost of one missed positive / one false alarm)")
    if method == "cost" and cost_fn == 0 and cost_fp == 0:
        raise InputError(f"{prefix}cost_fn and {prefix}cost_fp are both 0: every threshold costs nothing; give at least one a positive cost")


class ProbabilityCalibration(nn.Module):
    """The state fitted on validation: ``temperature`` and the decision ``threshold`` (on the
    calibrated positive-class probability), as buffers saved in the checkpoint.

    A checkpoint without them (written before calibration existed) loads as temperature 1 and
    threshold 0.5: the model behaves as it did when it was trained.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.default_threshold = float(threshold)
        self.register_buffer("temperature", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_load_state_dict_pre_hook(self._fill_missing)

    @staticmethod
    def _fill_missing(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        state_dict.setdefault(prefix + "temperature", torch.tensor(1.0))
        state_dict.setdefault(prefix + "threshold", torch.tensor(module.default_threshold))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return probabilities(logits, self.temperature)


class PlattScaling(nn.Module):
    """``P(positive | score) = sigmoid(slope * score + intercept)`` (:func:`fit_platt`) as buffers in the
    checkpoint; NaN (no mapping) until fitted on labelled validation scores, and when loading a
    checkpoint written before it existed."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("slope", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("intercept", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_load_state_dict_pre_hook(self._fill_missing)

    @staticmethod
    def _fill_missing(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in ("slope", "intercept"):
            state_dict.setdefault(prefix + name, torch.tensor(float("nan"), dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return bool(torch.isfinite(self.slope)) and bool(torch.isfinite(self.intercept))

    def fit(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        slope, intercept = fit_platt(scores, labels)
        self.slope.fill_(slope)
        self.intercept.fill_(intercept)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.slope * scores.double() + self.intercept)

    def describe(self) -> dict[str, Any] | None:
        """JSON facts for a bundle's metadata (``None`` when not fitted)."""
        if not self.fitted:
            return None
        return {"method": "platt", "slope": float(self.slope), "intercept": float(self.intercept),
                "formula": "probability = 1 / (1 + exp(-(slope * score + intercept))), in float64; fitted on the labelled validation split"}  # fmt: skip
