"""Tiny models and hook-listing helpers shared by the probes tests."""

from __future__ import annotations

import torch
from torch import nn

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def hook_state(model: nn.Module) -> dict[tuple[str, str], tuple]:
    """Every registered hook of every module (torch dicts and HookPoint handle lists)."""
    state = {}
    for path, module in model.named_modules():
        for attr in _HOOK_DICTS:
            state[(path, attr)] = tuple(getattr(module, attr, {}).keys())
        for attr in ("fwd_hooks", "bwd_hooks"):
            if hasattr(module, attr):
                state[(path, attr)] = tuple(id(h) for h in getattr(module, attr))
    return state


def n_hooks(model: nn.Module) -> int:
    return sum(len(v) for v in hook_state(model).values())


def make_sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


class BoomAfter(nn.Module):
    """Identity that raises on its ``n``-th call, to break a model mid-capture."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.n:
            raise RuntimeError("boom")
        return x


def make_policy() -> nn.Module:
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class Policy(HookedRootModule):
        def __init__(self) -> None:
            super().__init__()
            self.torso = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            self.hook_torso = HookPoint()
            self.head = nn.Linear(8, 3)
            self.hook_logits = HookPoint()
            self.setup()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.hook_logits(self.head(self.hook_torso(self.torso(x))))

    torch.manual_seed(0)
    return Policy()


def make_bridge() -> nn.Module:
    from transformer_lens import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        d_model=16, d_head=4, n_layers=2, n_ctx=8, n_heads=4, d_vocab=20, act_fn="gelu", seed=0
    )
    return TransformerBridge.boot_native(cfg)
