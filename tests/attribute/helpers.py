"""Small recorded runs for the attribution tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import chisel


def policy(act: type[nn.Module] = nn.Tanh, d_in: int = 6, width: int = 16, n_actions: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), act(), nn.Linear(width, width), act(), nn.Linear(width, n_actions)).double()


def record_policy_gradient(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 4, batch: int = 32, seed: int = 1
) -> chisel.Run:
    """A few REINFORCE-shaped steps with factors and tags, stored exactly (float64)."""
    gen = torch.Generator().manual_seed(seed)
    d_in = model[0].in_features
    with chisel.record(model, optimizer, run_dir, factors=True, dtype="float64", keyframe_every=2) as rec:
        for _ in range(steps):
            obs = torch.randn(batch, d_in, generator=gen, dtype=torch.float64)
            logits = model(obs)
            actions = torch.distributions.Categorical(logits=logits.detach()).sample()
            adv = torch.randn(batch, generator=gen, dtype=torch.float64)
            loss = -(torch.log_softmax(logits, -1)[torch.arange(batch), actions] * adv).mean()
            loss.backward()
            rec.tag(advantage=adv, reward=(adv > 0).double())
            optimizer.step()
            optimizer.zero_grad()
    return chisel.load(run_dir)
