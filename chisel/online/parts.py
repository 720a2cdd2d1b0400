"""One optimizer step split into parts, live: the same algebra as the offline replay
(`chisel.attribution.optim_models`), fed with the optimizer's own state copied before the step.

For every param: Δθ = weight_decay + momentum + gradient + residual, with gradient = κ ⊙ g (g the
gradient the optimizer consumed) and, for Adam, κ = −(lr/(1−β1^k))·(1−β1)/D with the denominator
D held fixed at the step, as chisel's offline credit split does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from chisel.attribution.optim_models import (
    GRADIENT,
    MOMENTUM,
    RESIDUAL,
    WEIGHT_DECAY,
    Coef,
    OptimizerModel,
    model_for,
)
from chisel.errors import ChiselError


class OnlineLedgerError(ChiselError, ValueError):
    """The model, optimizer, features or metric given to `chisel.online_ledger` do not fit."""


@dataclass
class ParamStep:
    """One param's step: its parts (param shape) and κ, the factor on its gradient."""

    parts: dict[str, Tensor]
    kappa: Coef


class OptimizerParts:
    """Copies the state the step will read (pre-hook), then splits the step (post-hook)."""

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str], dtype: torch.dtype):
        cls = type(optimizer).__name__
        model, why = model_for(cls)
        if model is None:
            raise OnlineLedgerError(
                f"{why}: the online ledger cannot split its steps into per-sample credit. Use "
                "SGD, Adam or AdamW, or pass credit=False for geometry and first-order rows only."
            )
        self.model: OptimizerModel = model
        self.cls, self.optimizer, self.names, self.dtype = cls, optimizer, names, dtype
        self._before: dict[str, dict[str, Any]] = {}

    def before_step(self) -> None:
        self._before = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) not in self.names:
                    continue
                raw = self.optimizer.state.get(p, {})
                state: dict[str, Any] = {}
                for key, name in self.model.state_keys.items():
                    value = raw.get(key)
                    if isinstance(value, Tensor):
                        state[name] = value.detach().to(self.dtype, copy=True)
                if "step" in raw:
                    state["step"] = int(float(raw["step"]))
                self._before[self.names[id(p)]] = state

    def after_step(self, theta: dict[str, Tensor], delta: dict[str, Tensor],
                   grads: dict[str, Tensor]) -> dict[str, ParamStep]:
        """{param: its parts} for the params that got a gradient; the residual closes Δθ."""
        out = {}
        for group in self.optimizer.param_groups:
            hyper = self.model.hyper(self.cls, group)
            for p in group["params"]:
                name = self.names.get(id(p))
                if name is None or name not in self._before or name not in grads:
                    continue
                th = theta[name] if self.model.needs_theta(hyper) else None
                step = self.model.step(hyper, th, grads[name], self._before[name])
                parts = {k: v if isinstance(v, Tensor) else torch.zeros_like(delta[name]) + v
                         for k, v in step.parts.items() if k in (WEIGHT_DECAY, MOMENTUM, GRADIENT)}
                parts[RESIDUAL] = delta[name] - sum(parts.values())
                out[name] = ParamStep(parts, step.kappa)
        return out
