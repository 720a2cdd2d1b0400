"""Small recorded runs and features for the validation tests (float64 throughout)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import chisel
import probes


def tanh_net(seed: int = 0, d_in: int = 5, width: int = 6, n_out: int = 3, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, width, bias=bias), nn.Tanh(), nn.Linear(width, n_out, bias=bias)
    ).double()


def record_run(run_dir: Path, model: nn.Module, steps: int = 6, lr: float = 0.05, seed: int = 1) -> chisel.Run:
    """A few Adam steps of a regression loss, recorded exactly (float64)."""
    gen = torch.Generator().manual_seed(seed)
    d_in = model[0].in_features
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with chisel.record(model, optimizer, run_dir, dtype="float64", keyframe_every=2):
        for _ in range(steps):
            x = torch.randn(32, d_in, generator=gen, dtype=torch.float64)
            target = torch.randn(32, model[-1].out_features, generator=gen, dtype=torch.float64)
            loss = ((model(x) - target - x[:, :1]) ** 2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return chisel.load(run_dir)


def states(n: int = 64, d_in: int = 5, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen, dtype=torch.float64) + 0.3  # a non-zero mean


def direction(values: list[float], name: str, site: str, concept: str) -> probes.Feature:
    return probes.custom(name, site, torch.tensor(values, dtype=torch.float64), metadata={"concept": concept})


def features_at_input(seed: int = 3, d_in: int = 5) -> probes.FeatureSet:
    """Non-unit, non-orthogonal read vectors at the first layer's input."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(2, d_in, generator=gen, dtype=torch.float64)
    raw[1] = 0.5 * raw[0] + raw[1]  # correlated with the first
    return probes.FeatureSet([
        probes.custom("a@in", "0:in", 3.0 * raw[0], normalize=False, metadata={"concept": "a"}),
        probes.custom("b@in", "0:in", raw[1], normalize=False, metadata={"concept": "b"}),
    ])


def logprob_metric(obs: torch.Tensor, seed: int = 4, n_out: int = 3):
    gen = torch.Generator().manual_seed(seed)
    actions = torch.randint(0, n_out, (len(obs),), generator=gen)
    return chisel.metrics.logprob(obs, actions)
