"""Shared helpers for the chisel tests: tiny models, optimizers, hook inspection."""

from __future__ import annotations

import torch
from torch import nn


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32, d_in: int = 6, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, 3)).to(dtype)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def module_hook_count(model: nn.Module) -> int:
    """Every hook dict torch keeps on a module, summed over all modules."""
    total = 0
    for m in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
        ):
            total += len(getattr(m, attr, {}))
    return total


def optimizer_hook_count(optimizer: torch.optim.Optimizer) -> int:
    return len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)
