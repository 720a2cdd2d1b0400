"""Reward-predictive labels of a rollout, against brute-force loops."""

import numpy as np
import pytest

from chisel.envs import next_reward_source, return_to_go, reward_within


def _random_rollout(seed: int, steps: int = 40, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sources = rng.choice([0, 0, 0, 1, 2], size=(steps, n)).astype(np.int8)
    dones = rng.random((steps, n)) < 0.15
    return sources, dones


def _episode_slice(dones: np.ndarray, t: int, i: int) -> range:
    end = t
    while end < len(dones) - 1 and not dones[end, i]:
        end += 1
    return range(t, end + 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_match_brute_force(seed: int) -> None:
    sources, dones = _random_rollout(seed)
    rewards = (sources != 0) * np.where(sources == 2, 0.5, 1.0)
    k, gamma = 3, 0.9
    within, rtg = reward_within(rewards, dones, k), return_to_go(rewards, dones, gamma)
    nxt = next_reward_source(sources, dones)
    for t in range(len(rewards)):
        for i in range(rewards.shape[1]):
            span = _episode_slice(dones, t, i)
            assert within[t, i] == any(rewards[j, i] != 0 for j in span if j < t + k)
            assert rtg[t, i] == pytest.approx(sum(gamma ** (j - t) * rewards[j, i] for j in span))
            assert nxt[t, i] == next((sources[j, i] for j in span if sources[j, i]), 0)


def test_reward_within_hand_case() -> None:
    rewards = np.array([[0.0], [0.0], [1.0], [0.0], [1.0]])
    dones = np.array([[False], [False], [True], [False], [False]])
    assert reward_within(rewards, dones, 2)[:, 0].tolist() == [False, True, True, True, True]
    assert return_to_go(rewards, dones, 0.5)[:, 0].tolist() == [0.25, 0.5, 1.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="at least one step"):
        reward_within(rewards, dones, 0)
