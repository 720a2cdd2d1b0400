"""Ground-truth labels: concepts of a state, and reward-predictive labels of a rollout."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from chisel.envs.config import CONCEPTS, FLOOR, HELD, TrashWorldConfig

if TYPE_CHECKING:
    from chisel.envs.state import TrashWorldState


def concept_labels(state: TrashWorldState, config: TrashWorldConfig) -> dict[str, np.ndarray]:
    """One [N] bool array per name in `CONCEPTS`, for the N rooms of `state`."""
    r = config.view_radius
    on_floor = state.trash_status == FLOOR  # [N, K]
    offset = np.abs(state.trash - state.agent[:, None])  # [N, K, 2]
    in_view = (offset <= r).all(axis=-1)
    button_in_view = (np.abs(state.button - state.agent) <= r).all(axis=-1)
    labels = {
        "trash_visible": (on_floor & in_view).any(axis=1),
        "trash_adjacent": (on_floor & (offset.sum(axis=-1) <= 1)).any(axis=1),
        "holding_trash": (state.trash_status == HELD).any(axis=1),
        "at_can": (state.agent == state.can).all(axis=1),
        "button_visible": state.button_on & button_in_view,
        "wall_blue": state.wall_blue.copy(),
    }
    assert tuple(labels) == CONCEPTS
    return labels


def reward_within(rewards: np.ndarray, dones: np.ndarray, k: int) -> np.ndarray:
    """[T, N] bool: a nonzero reward arrives within the next k steps of the same episode.

    rewards, dones: [T, N] in CleanRL order (reward[t] and done[t] follow action[t] taken in
    obs[t]). Label t is True if some rewards[t + j] != 0, 0 <= j < k, with no episode end in
    t .. t+j-1. Near the end of the rollout only the observed steps count.
    """
    if k < 1:
        raise ValueError(f"k={k}: reward_within needs a window of at least one step.")
    rewards, dones = np.asarray(rewards), np.asarray(dones, dtype=bool)
    steps = rewards.shape[0]
    out = np.zeros(rewards.shape, dtype=bool)
    alive = np.ones(rewards.shape, dtype=bool)  # no episode end between t and t+j-1
    for j in range(min(k, steps)):
        out[: steps - j] |= alive[: steps - j] & (rewards[j:] != 0)
        alive[: steps - j] &= ~dones[j:]
    return out


def return_to_go(rewards: np.ndarray, dones: np.ndarray, gamma: float) -> np.ndarray:
    """[T, N] float64: sum_j gamma^j rewards[t + j] up to the episode's end.

    Same conventions as `reward_within`; an episode cut by the rollout's end counts the
    observed rewards only (no bootstrap).
    """
    rewards, dones = np.asarray(rewards, dtype=np.float64), np.asarray(dones, dtype=bool)
    out = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[1:])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * running * ~dones[t]
        out[t] = running
    return out


def next_reward_source(sources: np.ndarray, dones: np.ndarray) -> np.ndarray:
    """[T, N] int8: the source (1 trash, 2 button) of the first reward at or after step t in
    the same episode, 0 if the episode (or the rollout) ends first. sources: [T, N]
    `info["reward_source"]` values in the same order as `reward_within`'s rewards."""
    sources, dones = np.asarray(sources), np.asarray(dones, dtype=bool)
    out = np.zeros(sources.shape, dtype=np.int8)
    running = np.zeros(sources.shape[1:], dtype=np.int8)
    for t in range(sources.shape[0] - 1, -1, -1):
        running = np.where(dones[t], 0, running)
        running = np.where(sources[t] != 0, sources[t], running).astype(np.int8)
        out[t] = running
    return out
