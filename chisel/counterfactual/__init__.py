"""Counterfactual reinforcement: the run as it would have been without some samples.

    >>> cf = chisel.counterfactual(run, model, remove=tag_in("next_reward_source", 2),
    ...                            metric=chisel.metrics.logprob(obs, press))  # doctest: +SKIP
    >>> cf.delta_metric, cf.predicted   # predicted effect and θ  # doctest: +SKIP

The package is callable: `chisel.counterfactual(...)` is `chisel.counterfactual.counterfactual`.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from chisel.counterfactual.predict import check_run, predict
from chisel.counterfactual.result import Counterfactual
from chisel.counterfactual.selection import (
    CounterfactualError,
    Selection,
    episodes,
    everything,
    nothing,
    resolve,
    samples,
    tag_in,
)
from chisel.store.reader import Run

Metric = Callable[[nn.Module], Tensor]


def counterfactual(
    run: Run,
    model: nn.Module | None = None,
    *,
    remove: Any,
    metric: Metric | None = None,
    horizon: int | None = None,
    until: int | None = None,
) -> Counterfactual:
    """Predict θ and the metric of the run with the selected samples' contributions removed.

    Args:
        run: a recorded run with gradients and per-sample factors (factors_every=1 for the
            samples of every step; steps without factors keep their whole part).
        model: the model the run trained (its architecture; the metric is evaluated on a
            float64 copy at the recorded and at the predicted θ). Needed only with `metric`.
        remove: what to remove: a tag predicate `tags -> mask [n]`, `tag_in(...)`,
            `episodes(fraction, seed)`, a sample set {step: [i, …]} / (step, i) pairs, "all",
            or None (nothing).
        metric: `model -> scalar tensor` (see chisel.metrics).
        horizon: earlier steps whose samples keep momentum credit (None: the steps whose
            momentum weight is >= 1%, credit's default rule: 44 for Adam's β1 = 0.9). Momentum
            beyond it stays, unremoved (part of `unresolved`).
        until: predict θ before this step (default: the end of the run).

    First order: Adam's denominators, clip coefficients and the collected data stay as
    recorded (docs/counterfactual.md).
    """
    return counterfactuals(
        run, model, removes=[remove], metric=metric, horizon=horizon, at=[until]
    )[0][0]


def counterfactuals(
    run: Run,
    model: nn.Module | None = None,
    *,
    removes: Sequence[Any],
    names: Sequence[str] | None = None,
    metric: Metric | None = None,
    horizon: int | None = None,
    at: Sequence[int | None] = (None,),
) -> list[list[Counterfactual]]:
    """Many selections and checkpoints in one pass: result[checkpoint][selection]."""
    if metric is not None and model is None:
        raise CounterfactualError("a metric needs the model: pass counterfactual(run, model, …).")
    if names is not None and len(names) != len(removes):
        raise CounterfactualError(f"{len(names)} names for {len(removes)} selections.")
    steps = [check_run(run, u) for u in at]
    selections = [resolve(r) for r in removes]
    labels = list(names) if names is not None else [repr(s) for s in selections]
    return predict(run, selections, labels, at=steps, horizon=horizon, metric=metric, model=model)


__all__ = [
    "Counterfactual",
    "CounterfactualError",
    "Selection",
    "counterfactual",
    "counterfactuals",
    "episodes",
    "everything",
    "nothing",
    "samples",
    "tag_in",
]


class _CallableModule(types.ModuleType):
    """`chisel.counterfactual(...)` works whether the name resolves to the package or the
    function (an import of a submodule rebinds the package attribute to the module)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Counterfactual:
        return counterfactual(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
