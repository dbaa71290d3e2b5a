"""Several callbacks dispatched by Lightning as one: :class:`CallbackGroup`.

Lightning calls every hook of every callback, whether the callback implements it or not: each
training step runs six callback hooks (``on_train_batch_start``, ``on_before_zero_grad``,
``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``, ``on_train_batch_end``),
and each call of each callback goes through a profiler context named after its ``state_key``. The
runner's own callbacks implement almost none of these per-step hooks; grouped, they cost one
dispatch per hook instead of one each (benchmarks/RESULTS.md, issue 22 "Per-step training cost").

A group calls, for each hook, the members that implement it, in the members' order, so grouping
adjacent callbacks changes nothing about what runs when. Members keep no state in checkpoints
(a stateful callback keeps its own ``state_key`` and stays alone).

Example:
    >>> from lightning.pytorch.callbacks import LearningRateMonitor
    >>> group = CallbackGroup(LearningRateMonitor())
    >>> [type(m).__name__ for m in group.members], "on_train_batch_start" in vars(group), "on_after_backward" in vars(group)
    (['LearningRateMonitor'], True, False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.profilers import PassThroughProfiler

#: every hook Lightning may call on a callback (state_dict / load_state_dict aside)
HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_") or name in ("setup", "teardown"))


def _implements(callback: Callback, hook: str) -> bool:
    return getattr(type(callback), hook) is not getattr(Callback, hook)


def _each(hooks: list[Callable[..., Any]]) -> Callable[..., Any]:
    if len(hooks) == 1:
        return hooks[0]

    def call(*args: Any, **kwargs: Any) -> None:
        for hook in hooks:
            hook(*args, **kwargs)

    return call


class CallbackGroup(Callback):
    """Callbacks that Lightning dispatches as one callback; each hook calls the members implementing it, in order.

    Raises:
        ValueError: a member saves state in checkpoints (``state_dict``): it must stay a callback of its own.
    """

    def __init__(self, *members: Callback) -> None:
        stateful = [type(m).__name__ for m in members if _implements(m, "state_dict") or _implements(m, "load_state_dict")]
        if stateful:
            raise ValueError(f"CallbackGroup members must keep no checkpoint state; pass {', '.join(stateful)} to the Trainer on its own")
        self.members = members
        self._state_key = f"{type(self).__qualname__}[{','.join(m.state_key for m in members)}]"  # read at every dispatch: built once
        for hook in HOOKS:  # instance attributes: Lightning looks hooks up with getattr on the callback
            implementations = [getattr(member, hook) for member in members if _implements(member, hook)]
            if implementations:
                setattr(self, hook, _each(implementations))

    @property
    def state_key(self) -> str:
        return self._state_key


_UNMEASURED = contextlib.nullcontext()


class UnmeasuredProfiler(PassThroughProfiler):
    """Lightning's default profiler (``PassThroughProfiler``: it measures nothing) without a context manager built per call.

    Lightning enters ``trainer.profiler.profile(name)`` around every hook it calls on each callback and on the module
    (on the grouped path, :mod:`pipelines.grouped_steps`, three hooks per optimizer step: 15 contexts with the runner's
    four callbacks, and many more per Lightning step); the default profiler's
    ``profile`` is a generator-based context manager (~2 us a call on a CPU). This one returns one shared, stateless
    ``nullcontext``. The runner passes it when no ``--trainer.profiler`` is given.

    Example:
        >>> profiler = UnmeasuredProfiler()
        >>> with profiler.profile("[Callback]x.on_after_backward"):
        ...     pass
        >>> profiler.profile("a") is profiler.profile("b"), isinstance(profiler, PassThroughProfiler)
        (True, True)
    """

    def profile(self, action_name: str) -> contextlib.nullcontext[None]:  # type: ignore[override]
        return _UNMEASURED
