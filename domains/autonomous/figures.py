"""Test-time figures of the autonomous model: predicted against true values, and trajectories (with intervals)."""

from __future__ import annotations

from typing import Any

import torch

from pipelines.plots import new_figure


def scatter_figure(pairs: Any, name: str, quantiles: list[float] | None = None) -> Any:
    """Predicted against true values with the diagonal. ``pairs``: ``(N, 2 + Q)``: true, predicted and, for a
    quantile model, its Q quantiles (the widest central interval is drawn as a vertical bar per point)."""
    from pipelines.quantiles import central_intervals

    fig, ax = new_figure(figsize=(4.4, 4.4))
    intervals = central_intervals(list(quantiles or []))
    title = "test: predicted vs true"
    if intervals:
        low, high, level = intervals[0]
        lower, upper = pairs[:, 2 + low], pairs[:, 2 + high]
        inside = float(((pairs[:, 0] >= lower) & (pairs[:, 0] <= upper)).mean())
        ax.vlines(pairs[:, 0], lower, upper, color="tab:orange", lw=0.6, alpha=0.35, label=f"{level:.0%} interval (covers {inside:.0%})")
        title += f"\n{level:.0%} intervals: {inside:.0%} of true values inside"
    ax.scatter(pairs[:, 0], pairs[:, 1], s=6, alpha=0.5, label="median" if intervals else None)
    low, high = pairs[:, :2].min(), pairs[:, :2].max()
    ax.plot([low, high], [low, high], "k--", lw=1)
    ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=title)
    if intervals:
        ax.legend(fontsize=7, loc="upper left")
    return fig


def trajectory_figure(batch: dict[str, torch.Tensor], count: int, names: list[str] | None = None, quantiles: list[float] | None = None) -> Any:
    """Observed (blue), true future (green), predicted (red) and sampled (grey) trajectories of ``count`` windows.

    With two or more channels the first two are drawn against each other (a map view, equal aspect:
    a metre is as long across as up, so a straight road looks straight); with one, the channel is
    drawn against the step. A quantile model's widest central interval is drawn per step, as a box
    (map view: each coordinate's interval) or a band.
    """
    from matplotlib.patches import Rectangle

    from pipelines.quantiles import central_intervals

    count = min(count, len(batch["past"]))
    cols = min(3, count)
    rows = -(-count // cols)
    fig, axes = new_figure(rows, cols, figsize=(3.8 * cols, 2.1 * rows), squeeze=False)
    names = names or ["x", "y"]
    intervals = central_intervals(list(quantiles or [])) if "quantiles" in batch else []
    for i, ax in enumerate(axes.flat):
        if i >= count:
            ax.axis("off")
            continue
        past, future, single = batch["past"][i], batch["future"][i], batch["single"][i]
        obs = len(past)

        def draw(points: torch.Tensor, start: int = 0, **style: Any) -> None:
            if points.shape[-1] >= 2:
                ax.plot(points[:, 0], points[:, 1], **style)
            else:
                ax.plot(range(start, start + len(points)), points[:, 0], **style)

        for sample in batch.get("samples", torch.zeros(0, 0, 0, 0))[i][:20] if "samples" in batch else []:
            draw(torch.cat([past[-1:], sample]), obs - 1, color="0.6", lw=0.6, alpha=0.6)
        if intervals:
            low, high, level = intervals[0]
            lower, upper = batch["quantiles"][i, low], batch["quantiles"][i, high]
            label = f"{level:.0%} interval"
            if past.shape[-1] >= 2:
                for t in range(len(lower)):
                    ax.add_patch(Rectangle((float(lower[t, 0]), float(lower[t, 1])), float(upper[t, 0] - lower[t, 0]), float(upper[t, 1] - lower[t, 1]),
                                           facecolor="tab:red", edgecolor="tab:red", alpha=0.12, lw=0.6, label=label if t == 0 else None))  # fmt: skip
            else:
                ax.fill_between(range(obs, obs + len(lower)), lower[:, 0], upper[:, 0], color="tab:red", alpha=0.15, lw=0, label=label)
        draw(past, 0, color="tab:blue", marker="o", ms=2, label="observed")
        draw(torch.cat([past[-1:], future]), obs - 1, color="tab:green", marker="o", ms=2, label="true")
        draw(torch.cat([past[-1:], single]), obs - 1, color="tab:red", marker="x", ms=3, label="predicted (median)" if intervals else "predicted")
        if past.shape[-1] >= 2:
            ax.set(xlabel=names[0], ylabel=names[1])
            _equal_aspect(ax, [past, future, single, *([batch["quantiles"][i].flatten(0, 1)] if intervals else [])])
        else:
            ax.set(xlabel="step", ylabel=names[0])
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)  # above the panels, over no data
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    return fig


def step_figure(errors: list[float], time_step: float | None, coverage: dict[str, list[float]] | None = None) -> Any:
    """The mean displacement error per horizon step and, for quantile models, each central interval's
    coverage per step beside its nominal level (a dashed line)."""
    steps = list(range(1, len(errors) + 1))
    fig, axes = new_figure(1, 2 if coverage else 1, figsize=(9.0 if coverage else 4.6, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, errors, marker="o", color="tab:red")
    ahead = f" ({time_step:g} time units each)" if time_step else ""
    ax.set(xlabel=f"forecast step{ahead}", ylabel="mean displacement error (data units)", title="test: error by horizon step")
    ax.set_ylim(bottom=0)
    for (label, values), color in zip((coverage or {}).items(), ("tab:orange", "tab:purple", "tab:brown", "tab:olive")):
        level = float(label.split("_")[-1]) / 100
        axes[0, 1].plot(steps, values, marker="o", color=color, label=f"{level:.0%} interval")
        axes[0, 1].axhline(level, color=color, linestyle="--", lw=1)
    if coverage:
        axes[0, 1].set(xlabel="forecast step", ylabel="share of true positions inside", title="test: interval coverage by step (dashed: nominal)", ylim=(0, 1.02))
        axes[0, 1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def _equal_aspect(ax: Any, points: list[torch.Tensor], least: float = 0.3) -> None:
    """Equal aspect (a unit across is as long as a unit up) around ``points``; the shorter side spans at least
    ``least`` of the longer one, so that a straight drive of 50 m still gets a readable strip."""
    stacked = torch.cat([p[:, :2].reshape(-1, 2) for p in points]).float()
    stacked = stacked[torch.isfinite(stacked).all(1)]  # a diverged model's NaN forecasts are not drawn and set no limits
    if not len(stacked):
        return
    low, high = stacked.min(0).values, stacked.max(0).values
    centre, half = (low + high) / 2, (high - low) / 2 * 1.08
    half = torch.maximum(half, half.max() * least).clamp(min=1e-6)
    ax.set_xlim(float(centre[0] - half[0]), float(centre[0] + half[0]))
    ax.set_ylim(float(centre[1] - half[1]), float(centre[1] + half[1]))
    ax.set_aspect("equal", adjustable="box")
