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
