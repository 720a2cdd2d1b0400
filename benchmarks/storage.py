"""Bytes per recorded step, by storage mode, for a CleanRL-CartPole-sized agent.

Prints, for each mode, the measured bytes per step of a 200-step recording and the projected size
of a 20,000-update run. Usage: python benchmarks/storage.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

import chisel

MODES = {
    "float32 (default)": {},
    "float32, factors": {"factors": True},
    "bfloat16, no grads": {"dtype": "bfloat16", "grads": False},
    "bfloat16, no grads, bf16 factors": {
        "dtype": "bfloat16", "grads": False, "factors": True, "factor_dtype": "bfloat16"
    },
    "bfloat16, grads, bf16 factors": {"dtype": "bfloat16", "factors": True, "factor_dtype": "bfloat16"},
}


class Agent(nn.Module):
    """CleanRL's CartPole PPO agent: separate 64-64 tanh actor and critic (9,155 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        self.actor = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))


def measure(root: Path, name: str, options: dict, steps: int = 200, batch: int = 128) -> float:
    torch.manual_seed(0)
    agent = Agent()
    optimizer = torch.optim.Adam(agent.parameters(), lr=2.5e-4, eps=1e-5)
    run_dir = root / name.replace(" ", "_").replace(",", "")
    with chisel.record(agent, optimizer, run_dir, keyframe_every=1000, **options):
        for _ in range(steps):
            obs = torch.randn(batch, 4)
            loss = agent.actor(obs).logsumexp(-1).mean() + agent.critic(obs).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    run = chisel.load(run_dir)
    steps_bytes = sum(f.stat().st_size for f in (run_dir / "steps").iterdir())
    return steps_bytes / len(run)


def main() -> None:
    n_params = sum(p.numel() for p in Agent().parameters())
    print(f"agent: {n_params:,} parameters, minibatch 128, Adam")
    print(f"{'mode':36s} {'bytes/step':>11s} {'20k updates':>12s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in MODES.items():
            per_step = measure(Path(tmp), name, options)
            print(f"{name:36s} {per_step:11,.0f} {per_step * 20000 / 2**20:9,.0f} MiB")


if __name__ == "__main__":
    main()
