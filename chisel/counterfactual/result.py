"""The typed result of a counterfactual prediction."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]


def _norm(p: Params) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in p.values()))


@dataclass(frozen=True)
class Counterfactual:
    """θ (and the metric) of the run with the selected samples' contributions removed.

    predicted = final − removed, where removed = Σ_t Σ_{selected i} (sample i's direct term of
    Δθ_t + what its gradient carried into Δθ_t through momentum / Adam's first moment), with
    the optimizer's denominators, clip coefficients and the collected data held at their
    recorded values (first order; see docs/counterfactual.md). `non_sample` is what would be
    left if every sample were removed: Σ_t weight decay + unresolved + residual, so removing all
    samples predicts θ_0 + non_sample.
    """

    selection: str  # repr of what was removed
    step: int  # θ before this step is predicted (len(run): the end of the run)
    horizon: int | None  # earlier steps whose samples get momentum credit (None: credit default)
    initial: Params  # θ_0, float64
    final: Params  # recorded θ at `step`, float64
    predicted: Params  # counterfactual θ at `step`, float64
    removed: Params  # final − predicted
    non_sample: Params  # Σ over steps of weight decay + unresolved + residual
    unresolved: Params  # Σ over steps of gradient/momentum (unresolved): no sample explains it
    removed_weight: float  # Σ of the selection's weights over samples of steps with factors
    samples: int  # samples in steps with factors
    steps: int  # optimizer steps before `step` (skipped ones excluded)
    steps_without_factors: int  # their samples cannot be removed (their part stays)
    metric_final: float | None = None
    metric_predicted: float | None = None
    metric_name: str = ""

    @property
    def delta_metric(self) -> float | None:
        """metric(predicted) − metric(final): the predicted effect of the removal."""
        if self.metric_final is None or self.metric_predicted is None:
            return None
        return self.metric_predicted - self.metric_final

    @property
    def fraction_removed(self) -> float:
        return self.removed_weight / self.samples if self.samples else 0.0

    @property
    def unresolved_share(self) -> float:
        """‖Σ unresolved‖ / ‖θ_step − θ_0‖: the learned change no recorded sample accounts for."""
        return self.unresolved_share_of(self.final)

    def unresolved_share_of(self, names: Iterable[str]) -> float:
        """`unresolved_share` over some params (e.g. the layers with factors)."""
        names = list(names)
        change = _norm({n: self.final[n] - self.initial[n] for n in names})
        return _norm({n: self.unresolved[n] for n in names}) / change if change else 0.0

    def load_into(self, model: nn.Module) -> nn.Module:
        """Write the predicted θ into `model` in place (each param keeps its dtype); returns it."""
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.predicted.items():
                named[name].copy_(value.to(named[name].dtype))
        return model

    def summary(self) -> dict[str, Any]:
        """The scalar fields, JSON-ready."""
        return {
            "selection": self.selection,
            "step": self.step,
            "horizon": self.horizon,
            "metric": self.metric_name,
            "metric_final": self.metric_final,
            "metric_predicted": self.metric_predicted,
            "delta_metric": self.delta_metric,
            "removed_norm": _norm(self.removed),
            "removed_weight": self.removed_weight,
            "samples": self.samples,
            "fraction_removed": self.fraction_removed,
            "steps": self.steps,
            "steps_without_factors": self.steps_without_factors,
            "unresolved_share": self.unresolved_share,
        }

    def __repr__(self) -> str:
        effect = "" if self.delta_metric is None else f", Δmetric={self.delta_metric:+.4g}"
        return (
            f"Counterfactual(remove={self.selection}, step={self.step}, "
            f"removed {self.fraction_removed:.1%} of samples{effect})"
        )
