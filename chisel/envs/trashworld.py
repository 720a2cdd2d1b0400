"""TrashWorld: a batch of walled rooms stepped together with numpy array ops.

The agent walks a room, picks up trash, and is rewarded for dropping it on the can. Options add
a reward button (reward without task completion) and a blue wall that correlates with trash.
`VecTrashWorld` is the batched simulator PPO uses; `TrashWorld` is the single-room
`gymnasium.Env` over the same code.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import gymnasium as gym
import numpy as np

from chisel.envs.config import (
    BUTTON_REWARD,
    CHANNELS,
    DROP,
    FLOOR,
    GONE,
    HELD,
    MOVES,
    PICK_UP,
    PRESS,
    TRASH_REWARD,
    Layout,
    LayoutError,
    TrashWorldConfig,
    TrashWorldConfigError,
)
from chisel.envs.labels import concept_labels
from chisel.envs.state import TrashWorldState

_DELTAS = np.array([*MOVES, (0, 0)], dtype=np.int64)  # [5, 2]; row 4 = no move


class VecTrashWorld:
    """N TrashWorld rooms stepped together; same-step autoreset, gymnasium-like API.

    `reset()` -> (obs [N, D] float32, info); `step(actions [N])` -> (obs, reward [N] float32,
    terminated [N] bool, truncated [N] bool, info). When a room's episode ends, the returned
    obs is already the first obs of its next episode; the last obs of the finished episode is
    `info["final_obs"][i]`. `info` holds one [N] bool array per concept in `CONCEPTS`
    (describing the returned obs), plus "reward_source" [N] int8 (0 none, 1 trash, 2 button),
    "episode_id" [N], "done" [N] bool, and "episode_return" / "episode_length" [N]
    (valid where done).
    """

    def __init__(self, config: TrashWorldConfig | None = None, num_envs: int = 1,
                 seed: int | None = None, *, autoreset: bool = True) -> None:
        self.config = config = config if config is not None else TrashWorldConfig()
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs}: a VecTrashWorld needs at least one room.")
        self.num_envs = num_envs
        self.autoreset = autoreset
        self.rng = np.random.default_rng(seed)
        self.total_steps = 0  # env steps taken, summed over rooms (drives button="late")
        self.button_enabled = config.button == "early"
        self._late_pending = config.button == "late"
        self._next_episode = 0
        self.single_observation_space = gym.spaces.Box(0.0, 1.0, (config.obs_dim,), np.float32)
        self.single_action_space = gym.spaces.Discrete(len(MOVES) + 3)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (num_envs, config.obs_dim), np.float32)
        self.action_space = gym.spaces.MultiDiscrete(np.full(num_envs, len(MOVES) + 3))
        self._wall_view = _wall_windows(config)  # [H*W, V, V]
        n, k = num_envs, config.n_trash
        self.state = TrashWorldState(
            agent=np.zeros((n, 2), np.int64), can=np.zeros((n, 2), np.int64),
            trash=np.zeros((n, k, 2), np.int64), trash_status=np.zeros((n, k), np.int8),
            button=np.zeros((n, 2), np.int64), button_on=np.zeros(n, bool),
            wall_blue=np.zeros(n, bool), t=np.zeros(n, np.int64), episode_id=np.zeros(n, np.int64))
        self._returns = np.zeros(n, np.float64)

    def set_button(self, enabled: bool) -> None:
        """Switch the reward button on or off for episodes that start from now on."""
        self.button_enabled = bool(enabled)
        self._late_pending = False

    # ---------------------------------------------------------------- reset
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None,
              rng: np.random.Generator | None = None
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Start a new episode in every room.

        seed (or an explicit generator `rng`) restarts the random stream and the episode ids.
        options: {"layout": Layout} for every room, or {"layouts": [Layout | None] * N} per room
        (None rooms are sampled).
        """
        if seed is not None or rng is not None:
            self.rng = rng if rng is not None else np.random.default_rng(seed)
            self._next_episode = 0
        options = options or {}
        self._reset_rooms(np.arange(self.num_envs))
        layouts = options.get("layouts")
        if "layout" in options:
            layouts = [options["layout"]] * self.num_envs
        if layouts is not None:
            if len(layouts) != self.num_envs:
                raise LayoutError(f"options['layouts'] has {len(layouts)} entries for "
                                  f"{self.num_envs} rooms; give one Layout (or None) per room.")
            for i, layout in enumerate(layouts):
                if layout is not None:
                    self._place(i, layout)
        return self._observe(), self._info(np.zeros(self.num_envs, np.int8))

    def _reset_rooms(self, idx: np.ndarray) -> None:
        cfg, s, m = self.config, self.state, len(idx)
        k = cfg.n_trash
        cells = np.argsort(self.rng.random((m, cfg.height * cfg.width)), axis=1)[:, : 3 + k]
        rc = np.stack(np.divmod(cells, cfg.width), axis=-1)  # [m, 3+K, 2]
        has_trash = self.rng.random(m) >= cfg.p_no_trash
        p_blue = np.where(has_trash, cfg.p_blue_given_trash, cfg.p_blue_given_no_trash)
        s.agent[idx], s.can[idx], s.button[idx] = rc[:, 0], rc[:, 1], rc[:, 2]
        s.trash[idx] = rc[:, 3:]
        s.trash_status[idx] = np.where(has_trash[:, None], FLOOR, GONE)
        s.button_on[idx] = self.button_enabled
        s.wall_blue[idx] = self.rng.random(m) < p_blue
        s.t[idx] = 0
        s.episode_id[idx] = np.arange(self._next_episode, self._next_episode + m)
        self._next_episode += m
        self._returns[idx] = 0.0

    def _place(self, i: int, layout: Layout) -> None:
        layout.check(self.config)
        s = self.state
        s.agent[i], s.can[i] = layout.agent, layout.can
        s.trash_status[i] = GONE
        for j, cell in enumerate(layout.trash):
            s.trash[i, j], s.trash_status[i, j] = cell, FLOOR
        if layout.holding:
            j = len(layout.trash)
            s.trash[i, j], s.trash_status[i, j] = layout.agent, HELD
        s.button_on[i] = layout.button is not None
        if layout.button is not None:
            s.button[i] = layout.button
        s.wall_blue[i] = layout.wall_blue

    # ---------------------------------------------------------------- step
    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                 np.ndarray, dict[str, np.ndarray]]:
        """Apply one action per room (ints in [0, 7), see `ACTION_NAMES`)."""
        a = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)
        reward, source = self._transition(a)
        s, cfg = self.state, self.config
        s.t += 1
        self._returns += reward
        terminated = ~(s.trash_status != GONE).any(axis=1) & ~s.button_on
        truncated = (s.t >= cfg.max_steps) & ~terminated
        done = terminated | truncated
        ep_return, ep_length = self._returns.copy(), s.t.copy()
        self.total_steps += self.num_envs
        if self._late_pending and self.total_steps >= cfg.button_after_steps:
            self.set_button(True)
        obs = self._observe()
        final_obs = obs.copy()
        if self.autoreset and done.any():
            self._reset_rooms(np.flatnonzero(done))
            obs = self._observe()
        info = self._info(source)
        info.update(done=done, final_obs=final_obs, episode_return=ep_return,
                    episode_length=ep_length)
        return obs, reward.astype(np.float32), terminated, truncated, info

    def _transition(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cfg, s = self.config, self.state
        rows = np.arange(self.num_envs)
        s.agent += _DELTAS[np.where(a < len(MOVES), a, len(MOVES))]
        np.clip(s.agent[:, 0], 0, cfg.height - 1, out=s.agent[:, 0])
        np.clip(s.agent[:, 1], 0, cfg.width - 1, out=s.agent[:, 1])
        holding = s.holding
        held = np.argmax(s.trash_status == HELD, axis=1)  # [N], meaningful where holding
        s.trash[rows[holding], held[holding]] = s.agent[holding]
        under = (s.trash == s.agent[:, None]).all(-1) & (s.trash_status == FLOOR)  # [N, K]
        on_trash = under.any(axis=1)
        at_can = (s.agent == s.can).all(axis=1)
        reward = np.zeros(self.num_envs, np.float64)
        source = np.zeros(self.num_envs, np.int8)

        pick = (a == PICK_UP) & ~holding & on_trash
        s.trash_status[rows[pick], np.argmax(under, axis=1)[pick]] = HELD
        deposit = (a == DROP) & holding & at_can
        s.trash_status[rows[deposit], held[deposit]] = GONE
        reward[deposit] += cfg.trash_reward
        source[deposit] = TRASH_REWARD
        put_down = (a == DROP) & holding & ~at_can & ~on_trash  # one piece per cell
        s.trash_status[rows[put_down], held[put_down]] = FLOOR
        press = (a == PRESS) & s.button_on & (s.agent == s.button).all(axis=1)
        s.button_on[press] = False
        reward[press] += cfg.button_reward
        source[press] = BUTTON_REWARD
        return reward, source

    # ---------------------------------------------------------------- observe
    def _observe(self) -> np.ndarray:
        cfg, s = self.config, self.state
        n, v, r = self.num_envs, cfg.view_size, cfg.view_radius
        grid = np.zeros((n, len(CHANNELS), v, v), np.float32)  # egocentric window
        grid[:, 0] = self._wall_view[s.agent[:, 0] * cfg.width + s.agent[:, 1]]

        def paint(channel: int, pos: np.ndarray, present: np.ndarray) -> None:
            rel = pos - s.agent + r  # [N, 2] window coordinates
            ok = present & ((rel >= 0) & (rel < v)).all(axis=1)
            grid[np.flatnonzero(ok), channel, rel[ok, 0], rel[ok, 1]] = 1.0

        for j in range(cfg.n_trash):
            paint(1, s.trash[:, j], s.trash_status[:, j] == FLOOR)
        paint(2, s.can, np.ones(n, bool))
        paint(3, s.button, s.button_on)
        flags = np.stack([s.holding, s.wall_blue], axis=1).astype(np.float32)  # [N, 2]
        return np.concatenate([grid.reshape(n, -1), flags], axis=1)

    def _info(self, source: np.ndarray) -> dict[str, np.ndarray]:
        info: dict[str, np.ndarray] = dict(concept_labels(self.state, self.config))
        info["reward_source"] = source
        info["episode_id"] = self.state.episode_id.copy()
        return info

    def render(self, i: int = 0) -> str:
        """Room i as text: # wall (~ when blue), A agent (a when holding), T, C, B."""
        return render_room(self.state.room(i), self.config)


def _wall_windows(cfg: TrashWorldConfig) -> np.ndarray:
    """[H*W, V, V] float32: the wall channel of the window for each agent cell."""
    r, v = cfg.view_radius, cfg.view_size
    out = np.zeros((cfg.height * cfg.width, v, v), np.float32)
    dr, dc = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing="ij")
    for cell in range(cfg.height * cfg.width):
        row, col = divmod(cell, cfg.width)
        rr, cc = row + dr, col + dc
        out[cell] = ~((rr >= 0) & (rr < cfg.height) & (cc >= 0) & (cc < cfg.width))
    return out


def render_room(state: TrashWorldState, cfg: TrashWorldConfig) -> str:
    """A text picture of room 0 of `state`."""
    wall = "~" if state.wall_blue[0] else "#"
    rows = [[wall] * (cfg.width + 2)] + [
        [wall] + ["."] * cfg.width + [wall] for _ in range(cfg.height)] + [[wall] * (cfg.width + 2)]
    rows[state.can[0, 0] + 1][state.can[0, 1] + 1] = "C"
    if state.button_on[0]:
        rows[state.button[0, 0] + 1][state.button[0, 1] + 1] = "B"
    for (tr, tc), st in zip(state.trash[0], state.trash_status[0]):
        if st == FLOOR:
            rows[tr + 1][tc + 1] = "T"
    rows[state.agent[0, 0] + 1][state.agent[0, 1] + 1] = "a" if state.holding[0] else "A"
    return "\n".join("".join(row) for row in rows)


_COLOURS = {  # RGB of the cells of `render_room`'s characters
    ".": (235, 235, 235), "#": (90, 90, 90), "~": (60, 90, 200), "C": (40, 160, 60),
    "T": (150, 100, 40), "B": (220, 40, 40), "A": (20, 20, 20), "a": (240, 150, 0),
}


def render_rgb(state: TrashWorldState, cfg: TrashWorldConfig, cell: int = 8) -> np.ndarray:
    """Room 0 of `state` as an RGB picture [(H+2)·cell, (W+2)·cell, 3] uint8 (walls included);
    the colours follow `render_room`'s characters (blue walls, orange agent when holding)."""
    rows = render_room(state, cfg).splitlines()
    lut = np.array([_COLOURS[ch] for row in rows for ch in row], np.uint8)
    picture = lut.reshape(len(rows), len(rows[0]), 3)
    return np.repeat(np.repeat(picture, cell, axis=0), cell, axis=1)


def config_with(config: TrashWorldConfig | None, options: dict[str, Any]) -> TrashWorldConfig:
    """`config` (default: `TrashWorldConfig()`) with the fields named in `options` changed."""
    config = config if config is not None else TrashWorldConfig()
    names = [f.name for f in fields(TrashWorldConfig)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TrashWorldConfigError(
            f"TrashWorld got unknown options {unknown}; options are TrashWorldConfig fields: {names}.")
    return config.replace(**options) if options else config


class TrashWorld(gym.Env):
    """One TrashWorld room as a `gymnasium.Env` (no autoreset); same dynamics as `VecTrashWorld`.

    reset(options={"layout": Layout}) starts from a hand-built room. Observations are float32
    vectors of length `config.obs_dim`; `info` holds the concept labels as Python bools.
    Keyword `options` change fields of `config` (button="early", p_blue_given_trash=0.5, …), as
    `gymnasium.make("chisel/TrashWorld-v0", button="early")` passes them (see `register`).
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}  # noqa: RUF012 (gymnasium API)

    def __init__(self, config: TrashWorldConfig | None = None,
                 render_mode: str | None = None, **options: Any) -> None:
        self.config = config_with(config, options)
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode={render_mode!r}: TrashWorld renders 'ansi' (text) or "
                             "'rgb_array' (SB3's make_vec_env asks for it).")
        self.render_mode = render_mode
        self._vec = VecTrashWorld(self.config, num_envs=1, autoreset=False)
        self.observation_space = self._vec.single_observation_space
        self.action_space = self._vec.single_action_space

    @property
    def state(self) -> TrashWorldState:
        """The room's full state (a batch of one)."""
        return self._vec.state

    def set_button(self, enabled: bool) -> None:
        """Switch the reward button on or off for episodes that start from now on."""
        self._vec.set_button(enabled)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        # one generator, seeded the gymnasium way; a new seed restarts the episode ids too
        rng = self.np_random if seed is not None or self._vec.rng is not self.np_random else None
        obs, info = self._vec.reset(options=options, rng=rng)
        return obs[0], _first(info)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self._vec.step(np.array([action]))
        for key in ("final_obs", "done", "episode_return", "episode_length"):
            info.pop(key)
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), _first(info)

    def render(self) -> str | np.ndarray | None:
        if self.render_mode == "rgb_array":
            return render_rgb(self.state, self.config)
        return self._vec.render(0) if self.render_mode == "ansi" else None


def _first(info: dict[str, np.ndarray]) -> dict[str, Any]:
    return {key: value[0].item() for key, value in info.items()}
