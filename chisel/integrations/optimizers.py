"""Find the optimizer whose step hooks see every update, through wrappers such as accelerate's.

`accelerate.AcceleratedOptimizer` (used by HF `Trainer`, TRL, `Accelerator.prepare`) subclasses
`torch.optim.Optimizer` but never runs its `__init__`: `register_step_pre_hook` exists and
raises `AttributeError` (no `_optimizer_step_pre_hooks`). Its `step()` calls the wrapped
optimizer's `step()` only when gradients are synchronised (gradient accumulation), so hooking
the wrapped optimizer records exactly the real updates. Lightning's `LightningOptimizer` keeps
the real one as `_optimizer`.

A wrapper that *is* a working optimizer (it ran `Optimizer.__init__`, e.g. a Lookahead that
moves slow weights in its own `step`) is kept: its step is the whole update.
"""

from __future__ import annotations

from typing import Any

import torch

from chisel.errors import RecordConfigError

_INNER = ("optimizer", "_optimizer")  # accelerate / transformers; Lightning
_MAX_DEPTH = 8


def _has_hook_registry(obj: Any) -> bool:
    """True for an optimizer whose instance ran `torch.optim.Optimizer.__init__`."""
    return isinstance(obj, torch.optim.Optimizer) and "_optimizer_step_pre_hooks" in vars(obj)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """`optimizer` itself when it can hold step hooks, else the optimizer it wraps (followed
    through `.optimizer` / `._optimizer`, several levels deep).

    Raises `RecordConfigError` (before anything touches disk) when no hookable optimizer is found.
    """
    current, path = optimizer, []
    for _ in range(_MAX_DEPTH):
        if _has_hook_registry(current):
            return current
        path.append(type(current).__name__)
        inner = next((getattr(current, a) for a in _INNER if getattr(current, a, None) is not None), None)
        if inner is None or inner is current:
            break
        current = inner
    raise RecordConfigError(
        f"{' → '.join(path)} is not a torch optimizer chisel can hook: it has no step-hook "
        "registry (torch.optim.Optimizer.__init__ never ran on it) and wraps no optimizer as "
        "`.optimizer` / `._optimizer`. Pass the torch.optim.Optimizer that updates the model "
        "(for accelerate: the optimizer you gave to accelerator.prepare, or prepared.optimizer)."
    )
