"""A scripted oracle with full view of the room: the reference return for TrashWorld.

The room has no inner walls, so the shortest path between two cells is their Manhattan
distance. From any state the oracle enumerates every order of its remaining jobs (deposit the
held piece, fetch-and-deposit each floor piece, press the button) that fits in the steps left,
keeps the one with the most reward and then the fewest steps, and takes that plan's first
action. Replanning every step keeps it a pure function of the state.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from chisel.envs.config import DOWN, DROP, FLOOR, LEFT, PICK_UP, PRESS, RIGHT, UP, Cell
from chisel.envs.trashworld import VecTrashWorld

Policy = Callable[[VecTrashWorld, np.ndarray], np.ndarray]
"""policy(env, obs [N, D]) -> actions [N] int."""

_DEPOSIT, _BUTTON = -1, -2  # job ids beside the floor-trash indices 0..K-1


def oracle_actions(env: VecTrashWorld) -> np.ndarray:
    """[N] int64: the oracle's action in each room of `env`, read from its full state."""
    s, cfg = env.state, env.config
    out = np.empty(env.num_envs, np.int64)
    holding = s.holding
    for i in range(env.num_envs):
        floor = tuple(tuple(int(x) for x in s.trash[i, j])
                      for j in range(cfg.n_trash) if s.trash_status[i, j] == FLOOR)
        button = tuple(int(x) for x in s.button[i]) if s.button_on[i] else None
        out[i] = _first_action(tuple(int(x) for x in s.agent[i]), tuple(int(x) for x in s.can[i]),
                               floor, bool(holding[i]), button, int(cfg.max_steps - s.t[i]),
                               cfg.trash_reward, cfg.button_reward)
    return out


def oracle_policy(env: VecTrashWorld, obs: np.ndarray) -> np.ndarray:
    """The oracle as a `Policy` (it ignores obs and reads the state)."""
    return oracle_actions(env)


def _dist(a: Cell, b: Cell) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


@lru_cache(maxsize=1 << 16)
def _first_action(agent: Cell, can: Cell, floor: tuple[Cell, ...], holding: bool,
                  button: Cell | None, steps_left: int, trash_reward: float,
                  button_reward: float) -> int:
    jobs = ([_DEPOSIT] if holding else []) + list(range(len(floor)))
    jobs += [_BUTTON] if button is not None else []
    best: tuple[float, int] = (0.0, 0)  # (reward, -steps) of the empty plan
    best_first: int | None = None
    for n in range(1, len(jobs) + 1):
        for order in itertools.permutations(jobs, n):
            if holding and not _deposits_first(order):
                continue
            reward, steps, pos = 0.0, 0, agent
            for job in order:
                if job == _BUTTON:
                    steps, pos = steps + _dist(pos, button) + 1, button  # type: ignore[arg-type]
                    reward += button_reward
                else:
                    if job >= 0:
                        steps, pos = steps + _dist(pos, floor[job]) + 1, floor[job]
                    steps, pos = steps + _dist(pos, can) + 1, can
                    reward += trash_reward
            if steps <= steps_left and (reward, -steps) > best:
                best, best_first = (reward, -steps), order[0]
    if best_first is None:
        return UP  # nothing reachable pays; any action does
    target, act = {_DEPOSIT: (can, DROP), _BUTTON: (button, PRESS)}.get(
        best_first, (floor[best_first] if best_first >= 0 else can, PICK_UP))
    return _step_towards(agent, target) if agent != target else act  # type: ignore[arg-type]


def _deposits_first(order: tuple[int, ...]) -> bool:
    """The held piece must go in the can before another piece can be picked up."""
    for job in order:
        if job == _DEPOSIT:
            return True
        if job >= 0:
            return False
    return True


def _step_towards(agent: Cell, target: Cell) -> int:
    if agent[0] != target[0]:
        return DOWN if target[0] > agent[0] else UP
    return RIGHT if target[1] > agent[1] else LEFT


@dataclass(frozen=True)
class EvalResult:
    """Returns of whole episodes collected by `evaluate`."""

    returns: np.ndarray  # [E] undiscounted episode returns
    lengths: np.ndarray  # [E] episode lengths in steps

    @property
    def mean_return(self) -> float:
        return float(self.returns.mean())


def evaluate(policy: Policy, env: VecTrashWorld, episodes_per_env: int = 8,
             seed: int | None = None) -> EvalResult:
    """Run `policy` until every room of `env` finished `episodes_per_env` episodes.

    A fixed count per room (not the first E episodes overall, which favours short ones) keeps
    the mean return unbiased. The env must autoreset.
    """
    obs, _ = env.reset(seed=seed)
    done_count = np.zeros(env.num_envs, np.int64)
    returns: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    while (done_count < episodes_per_env).any():
        obs, _, _, _, info = env.step(policy(env, obs))
        keep = info["done"] & (done_count < episodes_per_env)
        returns.append(info["episode_return"][keep])
        lengths.append(info["episode_length"][keep])
        done_count += info["done"]
    return EvalResult(np.concatenate(returns), np.concatenate(lengths))


def oracle_return(env: VecTrashWorld, episodes_per_env: int = 8, seed: int | None = None) -> float:
    """Mean undiscounted return of the oracle: the reference for a trained agent."""
    return evaluate(oracle_policy, env, episodes_per_env, seed).mean_return
