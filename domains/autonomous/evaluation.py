"""What the autonomous model adds at the end of ``test`` beside its main metrics, and the checks of its options.

- forecasting: ``test/de_step_<k>``, the mean displacement error at horizon step ``k`` (1-based;
  the last one is the FDE), of the single prediction;
- quantile models (``--model.quantiles``): ``test/below_q<level>`` (share of true values below each
  predicted quantile) and ``test/coverage_<level>`` (inside each central interval; forecasting also
  per step, ``test/coverage_80_step_<k>``), pooled over coordinates: :mod:`pipelines.quantiles`;
- every task: ``test/attribution_<channel>``, the mean occlusion attribution of each input channel
  (:mod:`domains.autonomous.attributions`) and its bar chart;
- classification: temperature calibration's ECE, Brier score and reliability diagram, bootstrap
  intervals of accuracy and F1 (:mod:`pipelines.classifier_calibration`), the confusion matrix with
  class names.

It also holds the random draws of the stochastic forecasters at evaluation (:func:`evaluation_draws`).
"""

from __future__ import annotations

from typing import Any

import torch

from domains.autonomous.attributions import attribution_figure, input_names, occlusion_attributions
from domains.autonomous.figures import scatter_figure, step_figure, trajectory_figure
from pipelines.errors import InputError
from pipelines.evaluation_plots import confusion_figure
from pipelines.quantiles import central_intervals, check_quantiles, interval_label
from pipelines.sample_draws import normal_per_sample, uniform_per_sample
from pipelines.tracking import log_figure
from pipelines.weighted_metrics import multiclass_classification


def check_model_options(quantiles: Any, architecture: str, task: str, categories: list[int] | None = None, known_size: int = 0) -> list[float]:
    """The quantile levels (``[]`` when off), or :class:`InputError` naming the option and what was expected."""
    if architecture == "transformer" and (categories or known_size):
        option = "--data.categorical_channels" if categories else "--data.known_future_channels"
        raise InputError(
            f"{option} with --model.architecture transformer: PatchTST reads every input channel as numbers over the observed window only "
            "(no embedding of categories, no decoder for future-known values). Expected --model.architecture rnn, cvae or mixture"
        )
    if quantiles is None:
        return []
    levels = check_quantiles(quantiles, "--model.quantiles")
    if task == "classification":
        raise InputError(
            f"--model.quantiles {levels}: quantiles are predicted for regression and forecasting; --data.task classification predicts "
            "class probabilities (calibrated: --model.calibrate). Expected no --model.quantiles, or --data.task regression or forecasting"
        )
    if architecture in ("cvae", "mixture"):
        raise InputError(
            f"--model.quantiles {levels} with --model.architecture {architecture}: the stochastic forecasters express their spread as "
            "--model.num_samples sampled futures (predict writes them). Expected --model.architecture rnn or transformer for quantiles"
        )
    return levels


#: what each evaluation draw is for (the ``salt`` of :mod:`pipelines.sample_draws`)
POSTERIOR_CODE, PRIOR_CODES, MODE_CHOICES, MODE_NOISE = 1, 2, 3, 4


def evaluation_draws(model: Any, batch: dict[str, torch.Tensor], purpose: str) -> dict[str, Any]:
    """The random draws of a stochastic forecaster (``model.network``) at validation, test and predict, as keyword
    arguments of its ``training_forward`` (``purpose`` ``"loss"``) or its ``forward`` (``"futures"``); ``{}`` in training.

    Why drawn per window: ``val/loss`` (the CVAE's reconstruction through a code drawn from its posterior, plus the KL)
    and ``min_ade``/``min_fde`` (the best of K futures drawn from the prior: ``val/score``, the checkpoint monitor) were
    drawn from the global generator, so two evaluations of one checkpoint on the same data differed and the best
    checkpoint was picked partly by chance. The posterior mean would make ``val/loss`` deterministic but measure another
    thing than the training loss (it drops the code's spread) and cannot give K distinct futures; so the draws stay
    draws, as a VAE's ELBO and best-of-K are defined, each fixed by the window's ``index`` in its split (common random
    numbers): the score is a function of the weights and the data alone, whatever the batch size, order or process count.
    """
    if model.training:
        return {}
    net, hp, like = model.network, model.hparams, batch["inputs"]
    where = {"device": like.device, "dtype": like.dtype}
    if hp.architecture == "cvae":
        shape = (net.latent_size,) if purpose == "loss" else (hp.num_samples, net.latent_size)
        return {"noise": normal_per_sample(batch["index"], shape, POSTERIOR_CODE if purpose == "loss" else PRIOR_CODES, **where)}
    extra = hp.num_samples - net.modes
    if hp.architecture != "mixture" or purpose != "futures" or extra <= 0:
        return {}
    choices = uniform_per_sample(batch["index"], (extra,), MODE_CHOICES, **where)
    return {"draws": (choices, normal_per_sample(batch["index"], (extra, net.predict, net.target_dim), MODE_NOISE, **where))}


def occlusion(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, F)`` occlusion attributions of every input channel for ``model`` (a ``SensorSequenceModel``) on a batch."""
    hp, point = model.hparams, model.point_index
    if hp.task == "forecasting":
        known = batch.get("known")

        def positions(inputs: torch.Tensor) -> torch.Tensor:  # relative positions, normalised, in the window's frame
            repeated = known.repeat(len(inputs) // len(known), 1, 1) if known is not None else None  # the same future for every occlusion
            relative = torch.cumsum(model(inputs, repeated), 2)
            return (relative.sort(1).values if relative.shape[1] > 1 else relative)[:, point]

        scale = batch["displacement_scale"]
        return occlusion_attributions(positions, batch["inputs"], lambda a, b: (a - b).norm(dim=-1).mean(-1) * scale)
    if hp.task == "regression":
        std = batch["target_std"] if "target_std" in batch else float(model.trainer.datamodule.stats["target_std"])
        return occlusion_attributions(lambda x: model.regression_values(model.network(x), 0.0, 1.0)[:, point], batch["inputs"],
                                      lambda a, b: (a - b).abs() * std)  # fmt: skip
    return occlusion_attributions(lambda x: model.calibration.probabilities(model.network(x)), batch["inputs"], lambda a, b: 0.5 * (a - b).abs().sum(-1))


def _classification_values(logits: torch.Tensor, targets: torch.Tensor) -> Any:
    """Accuracy, ``score`` (1 - accuracy) and macro F1 of bootstrap resamples of these rows (a function of a count matrix)."""
    values = multiclass_classification(logits.detach().double().cpu().numpy(), targets.detach().cpu().numpy(), auroc=False)

    def resampled(counts: Any) -> dict[str, Any]:
        out = values(counts)
        return {"test/accuracy": out["accuracy"], "test/score": 1 - out["accuracy"], "test/f1": out["f1"]}

    return resampled


def log_test_outputs(model: Any) -> None:
    """Log the test metrics above and the test plots (rank zero), then reset what was accumulated."""
    hp, trainer = model.hparams, model.trainer
    values: dict[str, float] = {}
    figures: dict[str, Any] = {}
    if hp.task == "forecasting":
        values |= {f"test/de_step_{k + 1}": float(v) for k, v in enumerate(model.test_steps.compute())}
        model.test_steps.reset()
    if model.quantile_levels:
        values |= {f"test/{name}": value for name, value in model.test_coverage.compute().items()}
        model.test_coverage.reset()
    if hp.task == "forecasting":
        errors = [values[f"test/de_step_{k}"] for k in range(1, hp.predict + 1)]
        coverage = {label: [values[f"test/{label}_step_{k}"] for k in range(1, hp.predict + 1)]
                    for _, _, level in central_intervals(model.quantile_levels) for label in [interval_label(level)]}  # fmt: skip
        stats = getattr(getattr(trainer, "datamodule", None), "stats", None) or {}
        figures["test/error_by_step"] = step_figure(errors, stats.get("time_step"), coverage)
    windows = int(model.test_attribution.count)
    attributions = model.test_attribution.compute()
    model.test_attribution.reset()
    names = input_names(getattr(trainer, "datamodule", None), hp.input_size)
    if windows:
        values |= {f"test/attribution_{name}": float(a) for name, a in zip(names, attributions)}
        unit = {"forecasting": "data units, mean over steps", "regression": "target units", "classification": "total variation of the probabilities"}[hp.task]
        figures["test/channel_attributions"] = attribution_figure(attributions, names, unit, windows)
    if hp.task == "classification":
        calibration, extra, model.metric_intervals = model.calibration.evaluate_test(_classification_values)
        values |= {k: float(v) for k, v in calibration.items()}
        figures |= extra
        figures["test/confusion_matrix"] = confusion_figure(model.test_confusion.compute(), list(hp.class_names or []), "Confusion matrix, test")
        model.test_confusion.reset()
    model.log_dict(values, sync_dist=True)
    if not (hp.plot_samples and trainer.is_global_zero):
        return
    if hp.task == "regression" and model._scatter:
        figures["test/predicted_vs_true"] = scatter_figure(torch.cat(model._scatter).numpy(), (hp.target_names or ["target"])[0], model.quantile_levels)
    if hp.task == "forecasting" and model._plot_items:
        batch = {key: torch.stack([item[key] for item in model._plot_items]) for key in model._plot_items[0]}
        figures["test/trajectories"] = trajectory_figure(batch, hp.plot_samples, hp.target_names, model.quantile_levels)
    for key, figure in figures.items():
        log_figure(trainer, figure, key)


def keep_for_plot(model: Any, batch: dict[str, torch.Tensor], pred: dict[str, torch.Tensor]) -> None:
    """Keep the first test window of each of the first ``plot_samples`` sequences (consecutive windows look alike)."""
    datamodule = getattr(model.trainer, "datamodule", None)
    for i in range(len(batch["past"])):
        if len(model._plot_items) >= model.hparams.plot_samples:
            return
        name = datamodule.window_name(int(batch["index"][i])) if datamodule is not None else str(len(model._plot_items))
        if name.split("/")[0] in model._plot_sequences:
            continue
        model._plot_sequences.add(name.split("/")[0])
        item = {"past": batch["past"][i], "future": batch["future"][i], **{k: v[i] for k, v in pred.items()}}
        model._plot_items.append({k: v.detach().cpu() for k, v in item.items()})
