"""TrashWorld as a `gymnasium.vector.VectorEnv`: `VecTrashWorld`'s numpy-batched rooms behind
Gymnasium's vector API (same-step autoreset), for `gymnasium.make_vec("chisel/TrashWorld-v0")`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from chisel.envs.config import TrashWorldConfig
from chisel.envs.trashworld import VecTrashWorld, config_with


class TrashWorldVectorEnv(gym.vector.VectorEnv):
    """`num_envs` TrashWorld rooms stepped together with array ops (no per-room Python loop).

    Same-step autoreset (`metadata["autoreset_mode"]`): when a room's episode ends, the
    returned observation is already the first of its next episode; the last one is
    `info["final_obs"][i]` (mask `info["_final_obs"]`), and `info["episode"]` holds its return
    "r" and length "l" (mask `info["_episode"]`). The concept labels, "reward_source" and
    "episode_id" describe the returned observations, for every room (their masks are all True).
    Keyword `options` are `TrashWorldConfig` fields, as for `TrashWorld`.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": ["ansi"]}  # noqa: RUF012

    def __init__(self, num_envs: int = 1, config: TrashWorldConfig | None = None,
                 render_mode: str | None = None, **options: Any) -> None:
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode={render_mode!r}: TrashWorldVectorEnv renders only 'ansi'.")
        self.config = config_with(config, options)
        self.render_mode = render_mode
        self.vec = VecTrashWorld(self.config, num_envs=num_envs)
        self.num_envs = num_envs
        self.single_observation_space = self.vec.single_observation_space
        self.single_action_space = self.vec.single_action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a new episode in every room; `seed` restarts the random stream and episode ids.
        options: as `VecTrashWorld.reset` ({"layout": Layout} or {"layouts": [...]})."""
        super().reset(seed=seed)
        rng = self.np_random if seed is not None else None
        obs, info = self.vec.reset(options=options, rng=rng)
        return obs, self._every_room(info)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                 np.ndarray, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.vec.step(actions)
        done, final_obs = info.pop("done"), info.pop("final_obs")
        ep_return, ep_length = info.pop("episode_return"), info.pop("episode_length")
        infos = self._every_room(info)
        if done.any():
            finals = np.full(self.num_envs, None, dtype=object)
            for i in np.flatnonzero(done):
                finals[i] = final_obs[i]
            infos.update(final_obs=finals, _final_obs=done.copy(), _episode=done.copy())
            infos["episode"] = {"r": np.where(done, ep_return, 0.0),
                                "l": np.where(done, ep_length, 0), "_r": done, "_l": done}
        return obs, reward.astype(np.float64), terminated, truncated, infos

    def _every_room(self, info: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in info.items():
            out[key], out[f"_{key}"] = value, np.ones(self.num_envs, bool)
        return out

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return "\n\n".join(self.vec.render(i) for i in range(self.num_envs))
