"""Metrics: scalar behaviour measures `model -> Tensor[]` that close over their own data.

Any callable works as a metric. The engine calls it with the model evaluated at the parameters
of a step (in float64 by default), so a metric must move its data to the model's dtype and
device: `as_input(x, model)` does that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

Metric = Callable[[nn.Module], Tensor]
Head = Callable[[nn.Module, Tensor], Tensor]


def as_input(x: Tensor, model: nn.Module) -> Tensor:
    """`x` in the dtype and on the device of the model's parameters (floats only)."""
    p = next(model.parameters())
    return x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)


def _default_logits(model: nn.Module, obs: Tensor) -> Tensor:
    out = model(obs)
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(
        f"the model returned a {type(out).__name__}; pass logits=lambda model, obs: ... to say "
        "where the action logits are."
    )


class _Named:
    """A metric with a readable repr (shown in ledgers and reports)."""

    def __init__(self, fn: Metric, description: str) -> None:
        self._fn = fn
        self.description = description

    def __call__(self, model: nn.Module) -> Tensor:
        return self._fn(model)

    def __repr__(self) -> str:
        return self.description


def logprob(obs: Tensor, actions: Tensor, *, logits: Head | None = None) -> Metric:
    """Mean log-probability of `actions [N]` in states `obs [N, ...]`."""
    head = logits or _default_logits
    actions = actions.long()

    def metric(model: nn.Module) -> Tensor:
        lp = torch.log_softmax(head(model, as_input(obs, model)), dim=-1)
        return lp.gather(-1, actions.to(lp.device)[:, None]).mean()

    return _Named(metric, f"logprob(actions, n={len(actions)})")


def _action_metric(
    obs: Tensor, action: int, where: Tensor | None, logits: Head | None, name: str, transform
) -> Metric:
    head = logits or _default_logits
    states = obs if where is None else obs[where.bool()]
    if len(states) == 0:
        raise ValueError(f"action_{name}: `where` selects no state; the metric would be undefined.")

    def metric(model: nn.Module) -> Tensor:
        return transform(head(model, as_input(states, model)))[:, action].mean()

    return _Named(metric, f"{name}[{action}] (n={len(states)})")


def action_logit(
    obs: Tensor, action: int, *, where: Tensor | None = None, logits: Head | None = None
) -> Metric:
    """Mean logit of `action` over the states `obs[where]` (e.g. where a concept holds)."""
    return _action_metric(obs, action, where, logits, "logit", lambda z: z)


def action_prob(
    obs: Tensor, action: int, *, where: Tensor | None = None, logits: Head | None = None
) -> Metric:
    """Mean probability of `action` over the states `obs[where]`."""
    return _action_metric(obs, action, where, logits, "prob", lambda z: torch.softmax(z, dim=-1))


def value(obs: Tensor, *, value_fn: Head) -> Metric:
    """Mean value estimate `value_fn(model, obs)` over `obs`."""

    def metric(model: nn.Module) -> Tensor:
        return value_fn(model, as_input(obs, model)).mean()

    return _Named(metric, f"value (n={len(obs)})")


def kl_to(reference_logits: Tensor, obs: Tensor, *, logits: Head | None = None) -> Metric:
    """Mean KL(π_ref ‖ π_θ) over `obs`, with π_ref given by `reference_logits [N, A]`."""
    head = logits or _default_logits
    ref = torch.log_softmax(reference_logits.double(), dim=-1)

    def metric(model: nn.Module) -> Tensor:
        lp = torch.log_softmax(head(model, as_input(obs, model)), dim=-1)
        r = ref.to(lp.device, lp.dtype)
        return (r.exp() * (r - lp)).sum(-1).mean()

    return _Named(metric, f"KL(ref || policy) (n={len(obs)})")


def describe(metric: Any) -> str:
    return getattr(metric, "description", None) or getattr(metric, "__name__", None) or repr(metric)
