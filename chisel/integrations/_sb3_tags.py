"""Per-sample tags of one SB3 rollout, in the flat (env-major) order `RolloutBuffer.get` uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from chisel.integrations._common import IntegrationError

SAMPLE_TAGS: tuple[str, ...] = (
    "advantage",  # GAE advantage from the rollout buffer, before any normalisation
    "advantage_used",  # the advantage the loss weighted the sample by (normalised per minibatch
    # when the algorithm normalises: PPO by default, A2C with normalize_advantage=True)
    "return",  # the buffer's return (advantage + value): the value loss's target
    "value",  # V(s) when the sample was collected
    "log_prob",  # log π_old(a | s) when the sample was collected
    "reward",  # the env's reward (before SB3 adds γ·V(s_T) to the reward of a truncated episode)
    "episode",  # episode id: unique over every learn() of this callback, counted from 0
    "env",  # index of the environment in the VecEnv
    "timestep",  # global env-step index of the sample (model.num_timesteps counting)
)
# the arrays RolloutBuffer.get flattens in place on its first call (rewards, episode_starts stay)
_FLATTENED_BY_GET = ("advantages", "returns", "values", "log_probs")


@dataclass
class EpisodeCounter:
    """Numbers episodes across rollouts (and across learn() calls of one callback)."""

    next_id: int = 0
    of_env: np.ndarray | None = field(default=None)  # [n_envs] the id running in each env

    def ids(self, starts: np.ndarray) -> np.ndarray:
        """[steps, n_envs] ids from `episode_starts` [steps, n_envs], numbered in order of their
        first step; an episode that runs on from the previous rollout keeps its id."""
        steps, n_envs = starts.shape
        if self.of_env is None or len(self.of_env) != n_envs:
            self.of_env = np.full(n_envs, -1, np.int64)
        starts = starts.astype(bool)  # a copy
        starts[0] |= self.of_env < 0  # an env seen for the first time starts one
        count = np.cumsum(starts.reshape(-1)).reshape(steps, n_envs)  # time-major numbering
        new = np.where(starts, self.next_id + count - 1, -1)
        latest = np.maximum.accumulate(new, axis=0)  # ids grow with time: max = latest start
        ids = np.where(latest >= 0, latest, self.of_env[None, :])
        self.next_id += int(count[-1, -1])
        self.of_env = ids[-1].copy()
        return ids


def rollout_tags(
    buf: Any, rewards: list[np.ndarray], first_timestep: int, episodes: EpisodeCounter
) -> dict[str, np.ndarray]:
    """Every sample's tags (but advantage_used, which depends on the minibatch), flat order.

    rewards: the env's rewards, one [n_envs] array per step of the rollout (else the buffer's).
    """
    steps, n_envs = buf.buffer_size, buf.n_envs

    def flat(a: Any, name: str = "") -> np.ndarray:
        a = np.asarray(a)
        if a.size != steps * n_envs:
            raise IntegrationError(
                f"ChiselCallback: rollout buffer array {name or '?'} has {a.size} values for "
                f"{steps} steps x {n_envs} envs; {type(buf).__name__} is not laid out like SB3's "
                "RolloutBuffer."
            )
        if buf.generator_ready and name in _FLATTENED_BY_GET:
            return a.reshape(-1)  # a get() ran already: env-major
        return a.reshape(steps, n_envs).swapaxes(0, 1).reshape(-1)

    t = np.arange(steps)[:, None]
    env = np.broadcast_to(np.arange(n_envs)[None, :], (steps, n_envs))
    out = {tag: flat(getattr(buf, name), name) for tag, name in (
        ("advantage", "advantages"), ("return", "returns"), ("value", "values"),
        ("log_prob", "log_probs"))}
    out["reward"] = flat(np.stack(rewards) if len(rewards) == steps else buf.rewards)
    out["episode"] = flat(episodes.ids(np.asarray(buf.episode_starts)))
    out["env"] = flat(env).astype(np.int64)
    out["timestep"] = flat(first_timestep + t * n_envs + env).astype(np.int64)
    return out


def advantage_used(advantages: torch.Tensor, normalise: bool) -> torch.Tensor:
    """The advantages [B] as PPO's / A2C's loss saw them (the same ops, so the same numbers)."""
    if normalise:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    return advantages.detach()
