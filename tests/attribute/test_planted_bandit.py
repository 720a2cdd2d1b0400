"""Known answer: in a contextual bandit whose cue decides reward, reinforcement of the rewarded
action flows through the cue feature, not through a distractor independent of reward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chisel
import probes

CUE = torch.tensor([1.0, 0.0, 0.0, 0.0])
DISTRACTOR = torch.tensor([0.0, 1.0, 0.0, 0.0])


def _states(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[cue ∈ {0,1}, distractor ∈ {−1,+1} (zero-mean, independent of reward), 2 noise dims]."""
    cue = torch.randint(0, 2, (n,), generator=gen).float()
    distractor = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    noise = 0.5 * torch.randn(n, 2, generator=gen)
    return torch.cat([cue[:, None], distractor[:, None], noise], 1), cue


def _cumulative_shares(tmp_path, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    with chisel.record(policy, optimizer, tmp_path / f"run{seed}", factors=True) as rec:
        for _ in range(60):  # REINFORCE: the rewarded action is the cue's value
            obs, cue = _states(64, gen)
            dist = torch.distributions.Categorical(logits=policy(obs))
            action = dist.sample()
            reward = (action == cue.long()).float()
            advantage = reward - reward.mean()
            (-(dist.log_prob(action) * advantage).mean()).backward()
            rec.tag(advantage=advantage, reward=reward)
            optimizer.step()
            optimizer.zero_grad()
    run = chisel.load(tmp_path / f"run{seed}")
    obs, cue = _states(256, gen)
    cue_present = obs[cue == 1]
    metric = chisel.metrics.logprob(cue_present, torch.ones(len(cue_present), dtype=torch.long))
    features = probes.FeatureSet([probes.custom("cue", "0:in", CUE), probes.custom("distractor", "0:in", DISTRACTOR)])
    # the plain (uncentred) split; the centred one is tested with a bias-like input below
    ledger = chisel.attribute(run, policy, features, metric, families=("integrated",), centred=False)
    final = chisel.timeline(ledger).iloc[-1]
    return float(final["cue"]), float(final["distractor"])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_cue_pathway_is_chiseled_not_the_distractor(tmp_path, seed):
    cue, distractor = _cumulative_shares(tmp_path, seed)
    assert cue > 0.1  # log π(rewarded action | cue present) rose, through the cue
    assert cue >= 10 * abs(distractor), (cue, distractor)
