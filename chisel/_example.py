"""A tiny REINFORCE run on a contextual bandit, recorded with chisel (the interim main job).

The observation holds a cue (which arm pays) and a distractor (noise); the policy learns to read
the cue. Used by `chisel demo --example` and as a readable end-to-end example of recording.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import chisel


def train_bandit(run_dir: str | Path, *, steps: int = 200, batch: int = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    policy = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    with chisel.record(
        policy, optimizer, run_dir, factors=True, overwrite=True, metadata={"seed": seed}
    ) as rec:
        for _ in range(steps):
            obs = torch.randn(batch, 4)
            cue = obs[:, 0] > 0  # arm 1 pays when the cue is positive
            dist = torch.distributions.Categorical(logits=policy(obs))
            action = dist.sample()
            reward = (action == cue.long()).float()
            advantage = reward - reward.mean()
            loss = -(dist.log_prob(action) * advantage).mean()
            loss.backward()
            rec.tag(advantage=advantage, reward=reward, cue=cue)
            optimizer.step()
            optimizer.zero_grad()
    return Path(run_dir)
