"""A private copy of the user's model that never fails on tensors with autograd history.

`copy.deepcopy` refuses non-leaf tensors ("Only Tensors created explicitly by the user support
the deepcopy protocol"). Models keep such tensors around more often than one would think:
Stable-Baselines3 keeps the last minibatch's action distribution (with its graph) on
`policy.action_dist`, and modules cache activations. Those tensors are state, not parameters:
the copy gets them detached.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

_MAX_DEPTH = 6


def private_copy(model: nn.Module) -> nn.Module:
    """`copy.deepcopy(model)`, with non-leaf tensors anywhere in its attributes detached."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as err:
        if "deepcopy" not in str(err):
            raise
    memo: dict[int, Any] = {}
    _detach_non_leaves(model, memo, set(), 0)
    return copy.deepcopy(model, memo)


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
