"""A private copy of the user's model that never fails on tensors with autograd history.

`copy.deepcopy` refuses non-leaf tensors ("Only Tensors created explicitly by the user support
the deepcopy protocol"). Models keep such tensors around more often than one would think:
Stable-Baselines3 keeps the last minibatch's action distribution (with its graph) on
`policy.action_dist`, and modules cache activations. Those tensors are state, not parameters:
the copy gets them detached.

Wrappers also patch `forward` on the instance (TRL and accelerate wrap it in closures that call
the *original* model's forward). A deep copy keeps such a closure as it is, so the copy would
silently run the user's modules, not its own: the copy's hooks never fire, and the metric is
evaluated at the wrong parameters. The copy therefore drops every instance-level `forward` that
is not a method bound to the copied module itself, and says so (`ForwardPatchWarning`).
"""

from __future__ import annotations

import copy
import types
import warnings
from typing import Any

from torch import Tensor, nn

_MAX_DEPTH = 6


class ForwardPatchWarning(UserWarning):
    """A module's `forward` was replaced on the instance; chisel's copy uses its class's forward."""


def private_copy(model: nn.Module) -> nn.Module:
    """`copy.deepcopy(model)`, with non-leaf tensors anywhere in its attributes detached and
    instance-level `forward` patches that would call back into `model` dropped."""
    try:
        copied = copy.deepcopy(model)
    except RuntimeError as err:
        if "deepcopy" not in str(err):
            raise
        memo: dict[int, Any] = {}
        _detach_non_leaves(model, memo, set(), 0)
        copied = copy.deepcopy(model, memo)
    _drop_forward_patches(copied)
    return copied


def _drop_forward_patches(copied: nn.Module) -> None:
    dropped = []
    for name, module in copied.named_modules():
        patch = module.__dict__.get("forward")
        if patch is None:
            continue
        if isinstance(patch, types.MethodType) and patch.__self__ is module:
            continue  # a method of this very module (deepcopy rebinds those): it runs the copy
        del module.__dict__["forward"]
        dropped.append(name or type(module).__name__)
    if dropped:
        warnings.warn(
            f"the model's forward was replaced on the instance ({', '.join(dropped)}), e.g. by "
            "TRL or accelerate; such a wrapper calls the original model, not chisel's copy, so "
            "the copy uses its class's forward instead. If the wrapper changed the computation "
            "(not just dtype casts or autocast), pass a model without it.",
            ForwardPatchWarning,
            stacklevel=3,
        )


def _detach_non_leaves(obj: Any, memo: dict[int, Any], seen: set[int], depth: int) -> None:
    """Put a detached clone of every non-leaf tensor reachable from `obj` into the deepcopy memo."""
    if id(obj) in seen or depth > _MAX_DEPTH:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        if not obj.is_leaf:
            memo[id(obj)] = obj.detach().clone()
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        _detach_non_leaves(child, memo, seen, depth + 1)
