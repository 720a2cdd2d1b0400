"""Options of `chisel.record`, frozen and validated, saved in the run manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from chisel.errors import RecordConfigError

StorageDtype = Literal["float64", "float32", "bfloat16", "float16"]
OptimStateMode = Literal["keyframes", "every_step", "none"]

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a storage-dtype name ("float32" → torch.float32)."""
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Compact:
    """Options of compact recording (`chisel.record(..., compact=True | Compact(...))`): bytes per
    step set by `rank`, not by the parameter count. Each weight of ≥ 2 dimensions whose update a
    rank-`rank` factorisation stores in at most a quarter of its size is stored, per step, as the
    factors U·diag(s)·Vᵀ of a rank-`rank` approximation of its update (see `feedback`); every
    other parameter (biases, norms, small matrices) is stored exactly. Keyframes stay exact; the
    error of every step is measured in float64 and stored (see docs/recording.md, "Compact
    recording")."""

    rank: int = 4
    """Rank of each weight's per-step update (its singular vectors and values)."""
    factor_dtype: StorageDtype = "float16"
    """Storage dtype of the singular vectors (entries ≤ 1 in magnitude; the singular values are
    float32); the rounding is fed back like the truncation."""
    oversample: int = 4
    """Extra columns of the randomised range finder (the sketch has rank + oversample columns)."""
    power_iters: int = 2
    """Power iterations of the range finder (sharper singular vectors for a flat spectrum)."""
    feedback: bool = False
    """False (default): factorise each step's own update θ_{t+1} − θ_t, so each stored product is
    that step's best rank-r view; the reader spreads what they all missed over the steps of a
    closed keyframe interval (see docs/recording.md). True: factorise θ_{t+1} − θ̂_t, carrying what
    earlier factors missed into this step (error feedback), so θ̂ itself stays near θ even in an
    interval not yet closed by a keyframe, at the price of each product mixing earlier steps'
    residuals (worse per-step attribution, measured in benchmarks/compact.py)."""

    def __post_init__(self) -> None:
        for field in ("rank", "oversample", "power_iters"):
            value = getattr(self, field)
            low = 1 if field == "rank" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RecordConfigError(f"Compact({field}={value!r}): use an integer >= {low}.")
        if not isinstance(self.feedback, bool):
            raise RecordConfigError(f"Compact(feedback={self.feedback!r}): use True or False.")
        if self.factor_dtype not in _DTYPES:
            raise RecordConfigError(
                f"Compact(factor_dtype={self.factor_dtype!r}) is not a storage dtype; use one of "
                f"{sorted(_DTYPES)}."
            )


@dataclass(frozen=True)
class RecordConfig:
    """What a `Recorder` stores. Every field is saved in the run manifest."""

    factors: bool | tuple[str, ...] = False
    """Per-sample factors (x_i, g_i): False, True (every Linear / Conv1D / Conv2d) or module names."""
    dtype: StorageDtype = "float32"
    """Storage dtype of updates and gradients. A parameter whose dtype this holds exactly is stored
    losslessly (θ after each step); otherwise as a delta in this dtype with the rounding error fed
    back and exact keyframes, so the error never accumulates (see docs/run-format.md)."""
    factors_every: int = 1
    """Capture factors on every this-many steps only (steps t with t % factors_every == 0), to
    bound the size of long runs; the other steps have updates but no factors."""
    factor_dtype: StorageDtype | None = None
    """Storage dtype of factors; None keeps the activations' own dtype (exact)."""
    grads: bool = True
    """Store the gradient the optimizer consumed at every step (needed for the exact credit split
    of momentum and Adam-like updates)."""
    optim_state: OptimStateMode = "keyframes"
    """When to store the optimizer state (exp_avg, exp_avg_sq, momentum_buffer…): at keyframes
    (replayable from the stored gradients), at every step, or never."""
    keyframe_every: int = 100
    """An exact copy of θ (and the optimizer state) before every this-many steps; 0 = only at the
    start, at a resume and at the end."""
    queue_size: int = 4
    """Steps handed to the background writer that may wait in memory before `step()` blocks."""
    fsync: bool = False
    """fsync every file before it becomes visible (survives power loss, not only a killed process)."""
    compact: Compact | None = None
    """Compact recording (low-rank per-step updates with error feedback, exact keyframes): see
    `Compact`; True takes its defaults. None (default) stores every update exactly."""

    def __post_init__(self) -> None:
        for field, value in (("dtype", self.dtype), ("factor_dtype", self.factor_dtype)):
            if value is not None and value not in _DTYPES:
                raise RecordConfigError(
                    f"{field}={value!r} is not a storage dtype; use one of {sorted(_DTYPES)}."
                )
        if self.optim_state not in ("keyframes", "every_step", "none"):
            raise RecordConfigError(
                f"optim_state={self.optim_state!r}; use 'keyframes', 'every_step' or 'none'."
            )
        if self.keyframe_every < 0:
            raise RecordConfigError(f"keyframe_every={self.keyframe_every} must be >= 0.")
        if self.factors_every < 1:
            raise RecordConfigError(f"factors_every={self.factors_every} must be >= 1.")
        if self.queue_size < 1:
            raise RecordConfigError(f"queue_size={self.queue_size} must be >= 1.")
        if self.compact is True:
            object.__setattr__(self, "compact", Compact())
        elif self.compact is False:
            object.__setattr__(self, "compact", None)
        elif self.compact is not None and not isinstance(self.compact, Compact):
            raise RecordConfigError(
                f"compact={self.compact!r}: use True, False or chisel.Compact(rank=..., ...)."
            )
        if not isinstance(self.factors, bool):
            names = (self.factors,) if isinstance(self.factors, str) else tuple(self.factors)
            if not all(isinstance(n, str) for n in names):
                raise RecordConfigError("factors must be True, False or a list of module names.")
            object.__setattr__(self, "factors", names)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if isinstance(self.factors, tuple):
            out["factors"] = list(self.factors)
        return out
