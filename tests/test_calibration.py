"""Calibration and operating points (pipelines/calibration.py) on synthetic data whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.calibration import (
    ProbabilityCalibration,
    brier_score,
    expected_calibration_error,
    fit_platt,
    fit_temperature,
    operating_threshold,
    probabilities,
    rates_at,
)


def calibrated_binary(n=20000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=generator) * 2
    labels = torch.bernoulli(torch.sigmoid(logits), generator=generator)
    return logits, labels


def test_a_perfectly_calibrated_score_has_ece_near_zero_and_noise_does_not():
    logits, labels = calibrated_binary()
    assert expected_calibration_error(torch.sigmoid(logits), labels) < 0.015
    noise = torch.rand(len(labels), generator=torch.Generator().manual_seed(1))
    assert expected_calibration_error(noise, labels) > 0.2  # a uniform random score claims what it does not know


def test_an_over_confident_score_has_high_ece_and_temperature_scaling_lowers_it():
    logits, labels = calibrated_binary()
    before = expected_calibration_error(probabilities(4 * logits), labels)
    temperature = fit_temperature(4 * logits, labels)
    after = expected_calibration_error(probabilities(4 * logits, temperature), labels)
    assert before > 0.08 and after < 0.015 and temperature == pytest.approx(4.0, rel=0.05)
    assert brier_score(probabilities(4 * logits, temperature), labels) < brier_score(probabilities(4 * logits), labels)


def test_temperature_scaling_for_several_classes_keeps_the_argmax():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(6000, 4, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator).squeeze(1)
    confident = logits * 3
    temperature = fit_temperature(confident, labels)
    assert temperature == pytest.approx(3.0, rel=0.06)
    assert expected_calibration_error(torch.softmax(confident, 1), labels) > 0.1
    assert expected_calibration_error(probabilities(confident, temperature), labels) < 0.03
    assert torch.equal(probabilities(confident, temperature).argmax(1), confident.argmax(1))


def test_brier_score_of_known_cases():
    labels = torch.tensor([0, 1, 1, 0])
    assert brier_score(labels.double(), labels) == 0.0
    assert brier_score(torch.full((4,), 0.5), labels) == 0.25
    assert brier_score(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 0])) == 2.0


def test_platt_scaling_recovers_a_logistic_link():
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(20000, generator=generator) * 10  # e.g. a reconstruction error
    labels = torch.bernoulli(torch.sigmoid(1.5 * scores - 9), generator=generator)
    slope, intercept = fit_platt(scores, labels)
    assert slope == pytest.approx(1.5, rel=0.1) and intercept == pytest.approx(-9, rel=0.1)
    assert all(math.isnan(v) for v in fit_platt(scores, torch.zeros_like(scores)))


def test_fits_work_inside_inference_mode_as_validate_and_test_run_them():
    """Lightning's ``validate``/``test`` run under ``torch.inference_mode``; the fits at validation end need
    autograd for their own parameters (``finance validate --ckpt_path`` crashed: "element 0 of tensors does not
    require grad"). Inside inference mode they give what they give outside."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(5000, generator=generator) * 10
    labels = torch.bernoulli(torch.sigmoid(1.5 * scores - 9), generator=generator)
    logits, binary = calibrated_binary(5000, seed=1)
    outside = (*fit_platt(scores, labels), fit_temperature(logits * 3, binary))
    with torch.inference_mode():
        inside = (*fit_platt(scores.clone(), labels.clone()), fit_temperature(logits.clone() * 3, binary.clone()))
    assert inside == pytest.approx(outside) and torch.is_inference_mode_enabled() is False


def brute_force_cost(scores, labels, cost_fn, cost_fp):
    grid = sorted(set(scores.tolist())) + [math.inf]
    costs = [(cost_fn * int(((scores < t) & (labels == 1)).sum()) + cost_fp * int(((scores >= t) & (labels == 0)).sum()), -t) for t in grid]
    cost, negative_t = min(costs)
    return -negative_t, cost


@pytest.mark.parametrize(("cost_fn", "cost_fp"), [(1, 1), (10, 1), (1, 10), (0, 1), (5, 0)])
def test_cost_based_threshold_matches_a_brute_force_optimum(cost_fn, cost_fp):
    generator = torch.Generator().manual_seed(cost_fn * 7 + cost_fp)
    labels = (torch.rand(400, generator=generator) < 0.2).long()
    scores = (labels + torch.randn(400, generator=generator)).round(decimals=1)  # many tied scores
    chosen = operating_threshold(scores, labels, "cost", cost_fn=cost_fn, cost_fp=cost_fp)
    expected, best_cost = brute_force_cost(scores, labels, cost_fn, cost_fp)
    flagged = scores >= chosen
    cost = cost_fn * int((~flagged & (labels == 1)).sum()) + cost_fp * int((flagged & (labels == 0)).sum())
    assert cost == best_cost and chosen == expected


def test_sensitivity_and_specificity_targets_are_met_with_the_best_other_rate():
    generator = torch.Generator().manual_seed(4)
    labels = (torch.rand(1000, generator=generator) < 0.3).long()
    scores = labels * 1.5 + torch.randn(1000, generator=generator)
    t = operating_threshold(scores, labels, "sensitivity", target=0.9)
    rates = rates_at(scores, labels, t)
    assert rates["sensitivity"] >= 0.9
    above = scores[scores > t].min()  # the next cut up misses the target
    assert rates_at(scores, labels, float(above))["sensitivity"] < 0.9
    t = operating_threshold(scores, labels, "specificity", target=0.95)
    assert rates_at(scores, labels, t)["specificity"] >= 0.95
    below = scores[scores < t].max()
    assert rates_at(scores, labels, float(below))["specificity"] < 0.95
    assert operating_threshold(scores, torch.zeros_like(labels), "cost", default=0.3) == 0.3  # one class: nothing to choose on


def test_calibration_state_is_in_the_state_dict_and_an_older_checkpoint_loads_uncalibrated():
    fitted = ProbabilityCalibration()
    fitted.temperature.fill_(2.5)
    fitted.threshold.fill_(0.2)
    loaded = ProbabilityCalibration()
    loaded.load_state_dict(fitted.state_dict())
    assert float(loaded.temperature) == 2.5 and float(loaded.threshold) == pytest.approx(0.2)
    fresh = ProbabilityCalibration()
    fresh.temperature.fill_(7.0)
    fresh.load_state_dict({})  # a checkpoint from before calibration
    assert float(fresh.temperature) == 1.0 and float(fresh.threshold) == 0.5
