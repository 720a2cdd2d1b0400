"""What the optimizer knows about a step: param names, hyper-parameters, state tensors."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from chisel.capture.distributed_fsdp import local_tensor
from chisel.errors import RecordConfigError


def hook_target(optimizer: Any) -> torch.optim.Optimizer:
    """The object that owns the step hooks (accelerate wraps the real optimizer)."""
    if hasattr(optimizer, "register_step_pre_hook"):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and hasattr(inner, "register_step_pre_hook"):
        return inner
    raise RecordConfigError(
        f"{type(optimizer).__name__} has no step hooks; pass a torch.optim.Optimizer (or a "
        "wrapper whose `.optimizer` is one)."
    )


def named_optimizer_params(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[list[str], list[nn.Parameter]]:
    """Names (from the model) and tensors of every parameter the optimizer updates, in order."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names, params, seen = [], [], set()
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) in seen:
                continue
            seen.add(id(p))
            names.append(by_id.get(id(p), f"optimizer.group{g}.{i}"))
            params.append(p)
    if not params:
        raise RecordConfigError(
            "The optimizer has no parameters to record. Build it from the model's parameters, "
            "e.g. torch.optim.Adam(model.parameters())."
        )
    if not any(id(p) in by_id for p in params):
        raise RecordConfigError(
            f"None of the optimizer's {len(params)} parameters belongs to the model "
            f"({type(model).__name__}): the optimizer trains another model. Pass the model whose "
            "parameters the optimizer was built from."
        )
    return names, params


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return None


def group_hyperparams(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Per param group: lr, betas, eps, weight_decay, momentum… and the state step count."""
    out = []
    for group in optimizer.param_groups:
        entry = {k: _jsonable(v) for k, v in group.items() if k != "params"}
        first = group["params"][0] if group["params"] else None
        step = optimizer.state.get(first, {}).get("step") if first is not None else None
        entry["state_step"] = _jsonable(step)
        out.append(entry)
    return out


def state_tensors(
    optimizer: torch.optim.Optimizer, names: list[str], params: list[nn.Parameter]
) -> dict[str, torch.Tensor]:
    """A copy of the optimizer state, keyed "<state key>/<param name>"."""
    out = {}
    for name, p in zip(names, params):
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                value = local_tensor(value)  # FSDP2: this rank's shard of the state
                out[f"{key}/{name}"] = value.detach().to("cpu", copy=True)
            elif isinstance(value, (int, float)):
                out[f"{key}/{name}"] = torch.tensor(value)
    return out
