"""``max_time`` covers the whole fit: what a model does before its first training batch counts too.

Lightning's :class:`~lightning.pytorch.callbacks.Timer` (``Trainer(max_time=...)``) starts its
training clock at ``on_train_start``, after ``setup`` and ``on_fit_start``: the media models train
their feature extractor (minutes on a CPU the first time a data set is seen) and read the data
there, so a run given ``max_time 00:00:05:00`` could overrun by the extractor's training. The
:class:`WholeFitClock` mixin notes when ``setup("fit")`` starts and, at ``on_train_start`` (after
the Timer's own), adds the time spent since to the Timer's elapsed training time through the
Timer's public ``time_elapsed`` and ``load_state_dict`` (what restores the elapsed time of a
resumed run). When that already exhausts the budget the run stops before its first batch.
"""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Timer


class WholeFitClock:
    """LightningModule mixin (put it before the Lightning base class): ``max_time`` counts from ``setup("fit")``."""

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._fit_clock_start = time.monotonic()
        super().setup(stage)  # type: ignore[misc]

    def on_train_start(self) -> None:
        super().on_train_start()  # type: ignore[misc]
        started = getattr(self, "_fit_clock_start", None)
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)  # type: ignore[attr-defined]
        if started is None or timer is None or timer.time_remaining() is None:
            return
        before_training = time.monotonic() - started
        timer.load_state_dict({"time_elapsed": {"train": timer.time_elapsed() + before_training}})
        exhausted = self.trainer.strategy.broadcast(timer.time_remaining() <= 0)  # type: ignore[attr-defined]
        if exhausted:
            print(f"[media] max_time spent before the first training batch ({before_training:.1f} s: data, feature extractor); stopping")
            self.trainer.should_stop = True  # type: ignore[attr-defined]
