"""The optimizers the replay models, one class each, behind a small protocol.

A model knows three things about its torch optimizer: which hyper-parameters of a param group
change the algebra (and how to read them), how one step moves one param and its state (split into
weight decay, momentum and gradient parts), and how its state is stored in a keyframe. Adding an
optimizer is one class and one `register_optimizer` call; a recorded optimizer class with no model
is not guessed at: its updates go to the residual with the reason (`model_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

WEIGHT_DECAY = "weight_decay"
MOMENTUM = "momentum"
GRADIENT = "gradient"
RESIDUAL = "residual"
PARTS = (WEIGHT_DECAY, MOMENTUM, GRADIENT, RESIDUAL)

Coef = Tensor | float  # a per-element factor (param shape) or one number for the whole param


@dataclass
class StepParts:
    """One param's step: parts[WEIGHT_DECAY | MOMENTUM | GRADIENT] (param shape); `kappa` the
    factor on this step's gradient, `carry` the factor on the buffer before the step (momentum
    part = carry ⊙ buf); the gradient enters the buffer as buf ← decay·buf + inject·g."""

    parts: dict[str, Tensor]
    kappa: Coef
    carry: Coef
    decay: float
    inject: float


class OptimizerModel(Protocol):
    """What the replay needs to know about one optimizer family."""

    classes: ClassVar[tuple[str, ...]]  # torch optimizer class names this model covers
    algebra: ClassVar[tuple[str, ...]]  # group keys that change the algebra (groups must agree)
    state_keys: ClassVar[dict[str, str]]  # keyframe state key -> the model's state name

    def hyper(self, cls: str, group: dict[str, Any]) -> Any:
        """The step's hyper-parameters from a recorded param group (a frozen dataclass)."""
        ...

    def step(self, hyper: Any, theta: Tensor | None, g: Tensor, state: dict[str, Any]) -> StepParts:
        """One step of one param in float64; updates `state` in place. θ, g: [*param]; θ is
        None when the hyper-parameters need no θ (`needs_theta`)."""
        ...

    def needs_theta(self, hyper: Any) -> bool:
        ...

    def count_note(self, hyper: Any, state: dict[str, Any] | None, group: dict[str, Any]) -> str:
        """Why the replayed state disagrees with the record ("" when it agrees)."""
        ...


def _number(value: Any, default: float = 0.0) -> float:
    return float(value) if value else default


# -- SGD ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SGDHyper:
    lr: float
    weight_decay: float = 0.0
    maximize: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


class SGDModel:
    """torch.optim.SGD: κ = −lr·(1−dampening) (Nesterov −lr·(1+μ(1−dampening))), the first
    momentum step undamped; momentum part μ·buf (Nesterov μ²·buf); L2 decay enters the gradient."""

    classes = ("SGD",)
    algebra = ("lr", "weight_decay", "maximize", "momentum", "dampening", "nesterov")
    state_keys = {"momentum_buffer": "buf"}  # noqa: RUF012

    def hyper(self, cls: str, group: dict[str, Any]) -> SGDHyper:
        return SGDHyper(
            lr=float(group["lr"]),
            weight_decay=_number(group.get("weight_decay")),
            maximize=bool(group.get("maximize")),
            momentum=_number(group.get("momentum")),
            dampening=_number(group.get("dampening")),
            nesterov=bool(group.get("nesterov")),
        )

    def needs_theta(self, hyper: SGDHyper) -> bool:
        return bool(hyper.weight_decay)

    def count_note(self, hyper: SGDHyper, state: dict[str, Any] | None, group: dict[str, Any]) -> str:
        return ""

    def step(self, h: SGDHyper, theta: Tensor | None, g: Tensor, state: dict[str, Any]) -> StepParts:
        sign = -1.0 if h.maximize else 1.0
        l2 = h.weight_decay * theta if h.weight_decay else torch.zeros_like(g)
        zero = torch.zeros_like(g)
        mu, buf = h.momentum, state.get("buf")
        if mu == 0:
            f, carry, mom = 1.0, 0.0, zero
        elif buf is None:  # first step: buf = g (no dampening)
            f, carry, mom = (1.0 + mu) if h.nesterov else 1.0, 0.0, zero
            state["buf"] = sign * g + l2
        else:
            w = 1.0 - h.dampening
            f = (1.0 + mu * w) if h.nesterov else w
            carry = -h.lr * (mu * mu if h.nesterov else mu)
            mom = carry * buf
            state["buf"] = mu * buf + w * (sign * g + l2)
        kappa = -h.lr * f * sign
        parts = {WEIGHT_DECAY: -h.lr * f * l2, MOMENTUM: mom, GRADIENT: kappa * g}
        fresh = mu != 0 and buf is None
        inject = sign * (1.0 if fresh else 1.0 - h.dampening) if mu else 0.0
        return StepParts(parts, kappa, carry, decay=0.0 if fresh else mu, inject=inject)


# -- Adam / AdamW ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdamHyper:
    lr: float
    weight_decay: float = 0.0
    maximize: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False
    decoupled: bool = False


class AdamModel:
    """torch.optim.Adam / AdamW: κ = −(lr/(1−β1^k))·(1−β1)/D with D = sqrt(v_k)/sqrt(1−β2^k) + eps
    held fixed at the step; momentum part −(lr/(1−β1^k))·β1·m_{t−1}/D; decoupled decay (AdamW)
    or L2 decay through the gradient (Adam)."""

    classes = ("Adam", "AdamW")
    algebra = ("lr", "weight_decay", "maximize", "betas", "eps", "amsgrad", "decoupled_weight_decay")
    state_keys = {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "vmax"}  # noqa: RUF012

    def hyper(self, cls: str, group: dict[str, Any]) -> AdamHyper:
        beta1, beta2 = group.get("betas") or (0.9, 0.999)
        return AdamHyper(
            lr=float(group["lr"]),
            weight_decay=_number(group.get("weight_decay")),
            maximize=bool(group.get("maximize")),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=_number(group.get("eps")),
            amsgrad=bool(group.get("amsgrad")),
            decoupled=cls == "AdamW" or bool(group.get("decoupled_weight_decay")),
        )

    def needs_theta(self, hyper: AdamHyper) -> bool:
        return bool(hyper.weight_decay)

    def count_note(self, hyper: AdamHyper, state: dict[str, Any] | None, group: dict[str, Any]) -> str:
        """Adam's bias correction needs the step count: the replay must agree with the record."""
        recorded = group.get("state_step")
        if state is None or recorded is None:
            return ""
        replayed = state.get("step", 0) + 1
        if int(recorded) != replayed:
            return f"the replayed Adam step count {replayed} differs from the recorded {recorded}"
        return ""

    def step(self, h: AdamHyper, theta: Tensor | None, g: Tensor, state: dict[str, Any]) -> StepParts:
        sign = -1.0 if h.maximize else 1.0
        b1, b2 = h.beta1, h.beta2
        l2 = h.weight_decay * theta if h.weight_decay and not h.decoupled else torch.zeros_like(g)
        gp = sign * g + l2
        m0 = state.get("m", torch.zeros_like(g))
        v = b2 * state.get("v", torch.zeros_like(g)) + (1 - b2) * gp * gp
        k = state.get("step", 0) + 1
        if h.amsgrad:
            state["vmax"] = torch.maximum(state.get("vmax", torch.zeros_like(g)), v)
        denom = (state["vmax"] if h.amsgrad else v).sqrt() / (1 - b2**k) ** 0.5 + h.eps
        a = -(h.lr / (1 - b1**k)) / denom  # [*param]
        decoupled = -h.lr * h.weight_decay * theta if h.weight_decay and h.decoupled else 0.0
        parts = {
            WEIGHT_DECAY: decoupled + a * (1 - b1) * l2,
            MOMENTUM: a * b1 * m0,
            GRADIENT: a * (1 - b1) * sign * g,
        }
        state.update(m=b1 * m0 + (1 - b1) * gp, v=v, step=k)
        return StepParts(parts, a * (1 - b1) * sign, a * b1, decay=b1, inject=(1 - b1) * sign)


# -- the registry ------------------------------------------------------------------------------
_MODELS: dict[str, OptimizerModel] = {}


def register_optimizer(model: OptimizerModel) -> None:
    """Let the replay split the updates of `model.classes` (torch optimizer class names)."""
    for cls in model.classes:
        _MODELS[cls] = model


def model_for(cls: str) -> tuple[OptimizerModel | None, str]:
    """The model of a recorded optimizer class, or (None, why) — never a guess."""
    model = _MODELS.get(cls)
    if model is None:
        return None, f"optimizer {cls} is not modelled ({', '.join(sorted(_MODELS))} are)"
    return model, ""


def state_from_keyframe(model: OptimizerModel | None, raw: dict[str, Tensor]) -> dict[str, Any]:
    """A keyframe's stored state of one param, under the model's names, in float64."""
    out: dict[str, Any] = {}
    for key, name in (model.state_keys if model is not None else {}).items():
        if key in raw:
            out[name] = raw[key].double().clone()
    if "step" in raw:
        out["step"] = int(float(raw["step"]))
    return out


register_optimizer(SGDModel())
register_optimizer(AdamModel())
