"""`StepRecord`: the typed metadata of one optimizer step, from capture through the store to attribution.

The capture stage fills what it sees around `optimizer.step()` (lr, hyper-parameters, clipping),
the writer completes it (norms, tags, the factor index) and stores it as JSON in the step file's
metadata; `Run.record(t)` gives it back. Every field name lives here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# optional fields written only when they hold something (older runs lack them too)
_OPTIONAL = (
    "skip_reason", "grad_coef", "grad_coef_residual", "clip_coef", "grads_scaled_by", "loss_scale",
    "update_norms", "factor_calls", "factor_layout", "factor_aliases", "compact",
)


@dataclass(frozen=True)
class StepRecord:
    """What was recorded about optimizer step `step` (θ_step → θ_step+1), besides its tensors."""

    step: int
    time: float | None = None
    """Wall-clock time (seconds since the epoch) when the step was taken."""
    skipped: bool = False
    """True when the optimizer left θ unchanged (AMP found inf/NaN gradients): no update."""
    skip_reason: str | None = None
    lr: float | None = None
    """The first parameter group's learning rate (every group's is in `groups`)."""
    groups: tuple[dict[str, Any], ...] = ()
    """Each parameter group's hyper-parameters (lr, betas, eps, weight_decay, momentum, …)."""
    grad_norm: float | None = None
    """‖g‖₂ of the gradient the optimizer consumed (after clipping, unscaled)."""
    grad_missing: tuple[str, ...] = ()
    """Parameters the optimizer holds that had no gradient at this step."""
    batch_sizes: tuple[int, ...] = ()
    """Samples of each backward pass that fed this step (one per accumulated micro-batch)."""
    grad_coef: float | None = None
    """c with `grad ≈ c · Σ_i g_i x_iᵀ` over the factor weights (clipping and unscaling folded in)."""
    grad_coef_residual: float | None = None
    """Relative residual of that fit (0 when the factors rebuild the gradient exactly)."""
    clip_coef: float | None = None
    grads_scaled_by: float | None = None
    """A fused optimizer's `grad_scale` under a GradScaler: the stored gradients are scaled by it."""
    loss_scale: float | None = None
    """The GradScaler's scale at a skipped step."""
    update_norm: float | None = None
    """‖Δθ‖₂ over every parameter (None at a skipped step)."""
    update_norms: dict[str, float] = field(default_factory=dict)
    """‖Δθ‖₂ per parameter name."""
    tags: dict[str, Any] = field(default_factory=dict)
    """`rec.tag(...)` values: scalars as they are, per-sample tensors as {"len": n} (read with
    `Run.tags(t)`)."""
    factor_calls: dict[str, int] = field(default_factory=dict)
    """Module name → number of back-propagated calls whose factors the step file holds."""
    factor_layout: dict[str, list[Any]] = field(default_factory=dict)
    """Factor key (X/<module>/<call>, G/<module>/<call>) → [dtype, offset, shape] in the packed vector."""
    factor_aliases: dict[str, str] = field(default_factory=dict)
    """Factor key → the key of an identical tensor stored once (a tensor read by two modules)."""
    compact: dict[str, Any] | None = None
    """A compact run's measured errors of this step (float64, over all parameters):
    update_error ‖Δθ − U·diag(s)·Vᵀ‖, error_before ‖θ_t − θ̂_t‖, error_after ‖θ_{t+1} − θ̂_{t+1}‖,
    update_errors {param: its update_error} (chisel/store/compact.py). Read them with
    `Run.update_error(t)` / `Run.params_error(t)`."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields this version of chisel does not know (written by a newer one), kept as they were."""

    @property
    def has_factors(self) -> bool:
        return bool(self.factor_calls)

    def to_json(self) -> dict[str, Any]:
        """The record as the JSON object stored in the step file (optional fields only when set)."""
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in _OPTIONAL and value in (None, {}):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["groups"] = [dict(g) for g in self.groups]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepRecord:
        """A record from its stored JSON object (checked beforehand by the store's `record_problems`)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        for name in ("groups", "grad_missing", "batch_sizes"):
            values[name] = tuple(values.get(name) or ())
        values["groups"] = tuple(dict(g) for g in values["groups"])
        for name in ("update_norms", "tags", "factor_calls", "factor_layout", "factor_aliases"):
            values[name] = dict(values.get(name) or {})
        values["skipped"] = bool(values.get("skipped", False))
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})
