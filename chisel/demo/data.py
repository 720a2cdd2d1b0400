"""Datasets from rollouts of an agent: states with ground-truth concept labels.

Concept labels come from the env's `info` (they describe the observation returned with them);
the reward-predictive label `reward_within_k` is derived from the rollout itself (a reward
follows within k steps of the same episode), so it is only known in hindsight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from chisel.agents.ppo import TrashAgent
from chisel.demo.config import REWARD_WITHIN
from chisel.envs import CONCEPTS, TrashWorldConfig, VecTrashWorld, reward_within


@dataclass(frozen=True)
class Rollout:
    """States of `rooms` rooms over `steps` steps, flattened time-major to N = steps * rooms."""

    obs: torch.Tensor  # [N, obs_dim] float32
    actions: torch.Tensor  # [N] int64, the action taken
    greedy: torch.Tensor  # [N] int64, the agent's argmax action in that state
    labels: dict[str, torch.Tensor]  # {concept: [N] bool}, CONCEPTS + reward_within_k
    reward_source: np.ndarray  # [N] int8, 0 none, 1 trash, 2 button

    def __len__(self) -> int:
        return len(self.obs)

    def usable_concepts(self) -> list[str]:
        """Concepts with both classes present (a probe needs two)."""
        return [c for c, y in self.labels.items() if 0 < int(y.sum()) < len(y)]


def rollout(
    agent: TrashAgent,
    env: TrashWorldConfig,
    *,
    rooms: int,
    steps: int,
    seed: int,
    reward_k: int,
    button_on: bool | None = None,
) -> Rollout:
    """Run the agent (sampling its policy) in `rooms` fresh rooms for `steps` steps.

    button_on: force the reward button on or off (e.g. on after a late button appeared).
    """
    envs = VecTrashWorld(env, rooms, seed=seed)
    if button_on is not None:
        envs.set_button(button_on)
    gen = torch.Generator().manual_seed(seed)
    obs, info = envs.reset()
    t_obs = np.zeros((steps, rooms, env.obs_dim), np.float32)
    acts, greedy = np.zeros((steps, rooms), np.int64), np.zeros((steps, rooms), np.int64)
    rewards, dones = np.zeros((steps, rooms), np.float32), np.zeros((steps, rooms), bool)
    sources = np.zeros((steps, rooms), np.int8)
    concepts = {c: np.zeros((steps, rooms), bool) for c in CONCEPTS}
    with torch.no_grad():
        for t in range(steps):
            t_obs[t] = obs
            for c in CONCEPTS:
                concepts[c][t] = info[c]
            logits, _ = agent(torch.from_numpy(obs))
            action = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0].numpy()
            acts[t], greedy[t] = action, logits.argmax(-1).numpy()
            obs, rewards[t], terminated, truncated, info = envs.step(action)
            dones[t], sources[t] = terminated | truncated, info["reward_source"]
    labels = {c: torch.from_numpy(v.reshape(-1)) for c, v in concepts.items()}
    labels[REWARD_WITHIN] = torch.from_numpy(reward_within(rewards, dones, reward_k).reshape(-1))
    return Rollout(
        torch.from_numpy(t_obs.reshape(-1, env.obs_dim)),
        torch.from_numpy(acts.reshape(-1)),
        torch.from_numpy(greedy.reshape(-1)),
        labels,
        sources.reshape(-1),
    )


def subsample(data: Rollout, n: int, seed: int) -> Rollout:
    """n states drawn without replacement (all of them if n >= len(data))."""
    if n >= len(data):
        return data
    idx = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(data), n, replace=False)))
    return Rollout(
        data.obs[idx],
        data.actions[idx],
        data.greedy[idx],
        {c: y[idx] for c, y in data.labels.items()},
        data.reward_source[idx.numpy()],
    )
