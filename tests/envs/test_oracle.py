"""The scripted oracle: optimal on hand-built rooms, and a reference return far above chance."""

import numpy as np
import pytest

from chisel.envs import (
    Layout,
    TrashWorldConfig,
    VecTrashWorld,
    evaluate,
    oracle_actions,
    oracle_return,
)


def _run_oracle(layout: Layout, **changes: object) -> tuple[float, int]:
    """(return, steps) of the oracle's episode from `layout`."""
    env = VecTrashWorld(TrashWorldConfig(**changes), num_envs=1, autoreset=False)
    env.reset(seed=0, options={"layout": layout})
    total, steps = 0.0, 0
    while True:
        _, reward, terminated, truncated, _ = env.step(oracle_actions(env))
        total, steps = total + float(reward[0]), steps + 1
        if terminated[0] or truncated[0]:
            return total, steps


@pytest.mark.parametrize(
    ("picture", "best_steps"),
    [
        # to T: 1 move + pick up, to C: 2 + 2 moves + drop
        ("A T . . .\n. . . . .\n. . . C .\n. . . . .\n. . . . .", 1 + 1 + 4 + 1),
        # two pieces: the order matters; checked against breadth-first search
        ("A T . . .\n. . . . .\n. . . . .\n. . . . .\nT . . . C", None),
        ("T . . . A\n. . . . .\n. . C . .\n. . . . .\n. . . . T", None),
        ("A . . . .\n. . T . .\n. . C . .\n. . T . .\n. . . . .", None),
    ],
)
def test_oracle_is_optimal_on_hand_built_rooms(picture: str, best_steps: int | None) -> None:
    layout = Layout.from_ascii(picture)
    expected = best_steps if best_steps is not None else _brute_force_steps(layout)
    assert _run_oracle(layout) == (len(layout.trash), expected)


def test_known_two_piece_shortest_plan() -> None:
    # A(0,0), T(0,1), T(4,0), C(4,4). Plans: T1 first: 1+1 + 7+1 (to can) + 4+1 + 4+1 = 20;
    # T2 first: 4+1 + 4+1 + 7+1 + 7+1 = 26. Optimal: 20 steps.
    layout = Layout.from_ascii("A T . . .\n. . . . .\n. . . . .\n. . . . .\nT . . . C")
    assert _run_oracle(layout) == (2.0, 20)


def test_oracle_presses_the_button_on_the_way() -> None:
    # A(0,0), T(0,2), C(0,4), B(1,2): T 2+1, C 2+1 = 6 steps; the button adds a detour of 2+1.
    layout = Layout.from_ascii("A . T . C\n. . B . .\n. . . . .\n. . . . .\n. . . . .")
    assert _run_oracle(layout, button="early") == (2.0, 9)


def test_oracle_takes_the_better_job_under_a_time_limit() -> None:
    # 4 steps left: the trash needs 8+1+... too far; the button at 3 moves pays within the limit.
    layout = Layout.from_ascii("A . . B .\n. . . . .\n. . . . .\n. . . . .\n. . . T C")
    ret, steps = _run_oracle(layout, button="early", max_steps=4, button_reward=0.5)
    assert (ret, steps) == (0.5, 4)
    ret, _ = _run_oracle(layout, button="early", max_steps=30, button_reward=0.5)
    assert ret == 1.5


def test_oracle_return_beats_random_by_far() -> None:
    env = VecTrashWorld(num_envs=32, seed=0)
    oracle = oracle_return(env, episodes_per_env=4, seed=0)
    rng = np.random.default_rng(0)
    rand = evaluate(lambda e, o: rng.integers(0, 7, e.num_envs), env, 4, seed=0).mean_return
    # p_no_trash = 0.2 and 2 pieces otherwise: the oracle collects ~1.6 per episode
    assert 1.3 < oracle <= 2.0 and rand < 0.2


def _brute_force_steps(layout: Layout) -> int:
    """Fewest steps to deposit every piece, by breadth-first search over full states."""
    from collections import deque

    cfg = TrashWorldConfig()
    start = (layout.agent, frozenset(layout.trash), False)
    seen, queue = {start}, deque([(start, 0)])
    while queue:
        (pos, floor, held), d = queue.popleft()
        if not floor and not held:
            return d
        nexts = []
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            r = min(max(pos[0] + dr, 0), cfg.height - 1)
            c = min(max(pos[1] + dc, 0), cfg.width - 1)
            nexts.append(((r, c), floor, held))
        if not held and pos in floor:
            nexts.append((pos, floor - {pos}, True))
        if held and pos == layout.can:
            nexts.append((pos, floor, False))
        for state in nexts:
            if state not in seen:
                seen.add(state)
                queue.append((state, d + 1))
    raise AssertionError("unsolvable layout")
