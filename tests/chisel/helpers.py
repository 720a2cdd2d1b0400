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


def assert_ledgers_match(got, want, *, rel: float = 1e-12) -> None:
    """Two attribution ledgers (DataFrames) hold the same rows, values within `rel` of the largest
    |value| of `want` (sums over ranks or shards add the same terms in another order)."""
    import pandas as pd

    key = [c for c in want.columns if c != "value" and want[c].dtype == object]
    a, b = (df.sort_values(key + ["step"]).reset_index(drop=True) for df in (got, want))
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    scale = float(b["value"].abs().max())
    torch.testing.assert_close(torch.tensor(a["value"].to_numpy(dtype=float)),
                               torch.tensor(b["value"].to_numpy(dtype=float)), rtol=0, atol=rel * scale,
                               equal_nan=True)
