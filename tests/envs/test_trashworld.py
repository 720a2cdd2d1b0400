"""TrashWorld dynamics, observations, concept labels, seeding and the vectorised batch."""

import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from chisel.envs import CONCEPTS, Layout, TrashWorld, TrashWorldConfig, VecTrashWorld
from chisel.envs.config import DOWN, DROP, LEFT, PICK_UP, PRESS, RIGHT, UP

ROOM = Layout.from_ascii("""
    A T . . .
    . . . . .
    . . C . .
    . . . . .
    . . . B T
""")


def _env(layout: Layout = ROOM, **changes: object) -> tuple[TrashWorld, np.ndarray, dict]:
    env = TrashWorld(TrashWorldConfig(**changes))
    obs, info = env.reset(seed=0, options={"layout": layout})
    return env, obs, info


def _window(obs: np.ndarray, channel: int, cfg: TrashWorldConfig) -> np.ndarray:
    v = cfg.view_size
    return obs[channel * v * v : (channel + 1) * v * v].reshape(v, v)


@pytest.mark.parametrize("button", ["none", "early", "late"])
def test_env_checker_passes(button: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any other complaint of the checker fails the test
        warnings.filterwarnings("ignore", message=".*spec.*")  # not registered: no gym.make spec
        check_env(TrashWorld(TrashWorldConfig(button=button), render_mode="ansi"))


def test_seeded_episodes_reproduce() -> None:
    def episode(seed: int) -> list:
        env = TrashWorld()
        obs, info = env.reset(seed=seed)
        acts = np.random.default_rng(seed).integers(0, 7, 60)
        out = [(obs.tobytes(), info)]
        for a in acts:
            step = env.step(int(a))
            out.append((step[0].tobytes(), *step[1:]))
            if step[2] or step[3]:
                obs, info = env.reset()
                out.append((obs.tobytes(), info))
        return out

    assert episode(7) == episode(7)
    assert episode(7) != episode(8)
    a, b = VecTrashWorld(num_envs=16, seed=3), VecTrashWorld(num_envs=16, seed=3)
    np.testing.assert_array_equal(a.reset()[0], b.reset()[0])
    for act in np.random.default_rng(0).integers(0, 7, (50, 16)):
        np.testing.assert_array_equal(a.step(act)[0], b.step(act)[0])


def test_pick_carry_and_deposit() -> None:
    env, _, info = _env()
    assert info["trash_adjacent"] and not info["holding_trash"]
    _, r, term, _, info = env.step(PICK_UP)  # nothing under the agent: no-op
    assert (r, info["holding_trash"]) == (0.0, False)
    env.step(RIGHT)
    _, r, _, _, info = env.step(PICK_UP)
    assert info["holding_trash"] and r == 0.0
    env.step(DROP)  # not on the can: the piece goes back on the floor
    assert env.state.trash[0, 0].tolist() == [0, 1] and not env.state.holding[0]
    env.step(PICK_UP)
    for a in (DOWN, DOWN, RIGHT):
        _, _, _, _, info = env.step(a)
    assert info["at_can"] and info["holding_trash"]
    _, r, term, _, info = env.step(DROP)
    assert r == 1.0 and info["reward_source"] == 1 and not term  # one piece left
    assert not info["holding_trash"] and info["at_can"]


def test_walls_block_and_episode_ends_when_nothing_pays() -> None:
    env, _, _ = _env(Layout(agent=(0, 0), can=(0, 1), holding=True))
    env.step(UP)
    env.step(LEFT)
    assert env.state.agent[0].tolist() == [0, 0]
    env.step(RIGHT)
    _, r, term, trunc, _ = env.step(DROP)
    assert (r, term, trunc) == (1.0, True, False)


def test_time_limit_truncates() -> None:
    env, _, _ = _env(max_steps=3)
    for _ in range(2):
        assert env.step(UP)[2:4] == (False, False)
    assert env.step(UP)[2:4] == (False, True)


def test_button_pays_once_without_task() -> None:
    env, _, info = _env(button="early")
    assert not info["button_visible"]  # (4, 3) is outside the 5x5 window around (0, 0)
    for a in (DOWN, DOWN, DOWN, DOWN, RIGHT, RIGHT, RIGHT):
        _, _, _, _, info = env.step(a)
    assert info["button_visible"]
    _, r, _, _, info = env.step(PRESS)
    assert r == 1.0 and info["reward_source"] == 2 and not info["button_visible"]
    assert env.step(PRESS)[1] == 0.0


def test_concept_labels_on_hand_built_layouts() -> None:
    cfg = TrashWorldConfig(view_radius=1)
    cases = {
        "A . . . .\n. . . . .\n. . . . .\n. . . T .\n. . . B C": dict(),
        "A T . . .\n. . . . .\n. . . . .\n. . . . .\n. . . B C": dict(
            trash_visible=True, trash_adjacent=True),
        "A . . . .\n. T . . .\n. . . . .\n. . . . .\n. . . B C": dict(trash_visible=True),
        "C . . . .\n. B . . .\n. . . . .\n. . T . .\n. . . . A": dict(),
    }
    for picture, expected in cases.items():
        env = TrashWorld(cfg)
        _, info = env.reset(options={"layout": Layout.from_ascii(picture)})
        assert {c: info[c] for c in CONCEPTS} == {c: expected.get(c, False) for c in CONCEPTS}
    _, info = env.reset(options={"layout": Layout(agent=(1, 1), can=(1, 1), button=(0, 0),
                                                  holding=True, wall_blue=True)})
    assert all(info[c] for c in ("holding_trash", "at_can", "button_visible", "wall_blue"))
    assert not info["trash_visible"] and not info["trash_adjacent"]


def test_egocentric_observation() -> None:
    cfg = TrashWorldConfig()
    env = TrashWorld(cfg)
    obs, _ = env.reset(options={"layout": ROOM.__class__(agent=(2, 2), can=(0, 4),
                                                         trash=((2, 3),), wall_blue=True)})
    wall, trash, can, button = (_window(obs, c, cfg) for c in range(4))
    assert wall.sum() == 0  # from the centre of a 5x5 room the window is all floor
    assert np.argwhere(trash).tolist() == [[2, 3]] and np.argwhere(can).tolist() == [[0, 4]]
    assert button.sum() == 0 and obs[-2:].tolist() == [0.0, 1.0]  # not holding, wall blue
    obs, _ = env.reset(options={"layout": Layout(agent=(0, 0), can=(4, 4))})
    wall = _window(obs, 0, cfg)
    assert wall[:2].all() and wall[:, :2].all() and not wall[2:, 2:].any()
    assert _window(obs, 2, cfg).sum() == 0  # the can is out of view


def test_vectorised_env_agrees_with_single_env() -> None:
    cfg = TrashWorldConfig(button="early", max_steps=20)
    vec = VecTrashWorld(cfg, num_envs=8, seed=11)
    obs, info = vec.reset()
    layouts = [_layout_of(vec, i) for i in range(8)]
    singles = [TrashWorld(cfg) for _ in range(8)]
    for env, layout, i in zip(singles, layouts, range(8)):
        o, inf = env.reset(options={"layout": layout})
        np.testing.assert_array_equal(o, obs[i])
        assert all(inf[c] == info[c][i] for c in CONCEPTS)
    live = np.ones(8, bool)
    rng = np.random.default_rng(1)
    for _ in range(25):
        acts = rng.integers(0, 7, 8)
        obs, rew, term, trunc, info = vec.step(acts)
        for i in np.flatnonzero(live):
            o, r, te, tr, inf = singles[i].step(int(acts[i]))
            final = info["final_obs"][i]
            np.testing.assert_array_equal(o, final)
            assert (r, te, tr) == (rew[i], term[i], trunc[i])
            if te or tr:
                live[i] = False  # the vector env autoreset into a fresh episode
            else:
                assert all(inf[c] == info[c][i] for c in CONCEPTS)
    assert not live.any()


def _layout_of(vec: VecTrashWorld, i: int) -> Layout:
    s = vec.state
    trash = tuple(tuple(t) for t, st in zip(s.trash[i].tolist(), s.trash_status[i]) if st == 1)
    return Layout(agent=tuple(s.agent[i].tolist()), can=tuple(s.can[i].tolist()), trash=trash,
                  button=tuple(s.button[i].tolist()) if s.button_on[i] else None,
                  wall_blue=bool(s.wall_blue[i]))


def test_autoreset_reports_the_finished_episode() -> None:
    vec = VecTrashWorld(num_envs=2, seed=0)
    vec.reset(options={"layout": Layout(agent=(0, 0), can=(0, 0), holding=True)})
    _, rew, term, _, info = vec.step(np.array([DROP, UP]))
    assert rew.tolist() == [1.0, 0.0] and term.tolist() == [True, False]
    assert info["episode_return"][0] == 1.0 and info["episode_length"][0] == 1
    assert info["episode_id"].tolist() == [2, 1]  # room 0 started episode 2
    assert info["final_obs"][0, -2] == 0.0 and vec.state.t.tolist() == [0, 1]


def test_blue_wall_tracks_trash_at_the_configured_rates() -> None:
    cfg = TrashWorldConfig(p_no_trash=0.5, p_blue_given_trash=0.9, p_blue_given_no_trash=0.1)
    vec = VecTrashWorld(cfg, num_envs=20_000, seed=0)
    vec.reset()
    has_trash = (vec.state.trash_status == 1).any(axis=1)
    blue = vec.state.wall_blue
    assert abs(has_trash.mean() - 0.5) < 0.02
    assert abs(blue[has_trash].mean() - 0.9) < 0.02
    assert abs(blue[~has_trash].mean() - 0.1) < 0.02


def test_late_button_appears_after_the_configured_steps() -> None:
    vec = VecTrashWorld(TrashWorldConfig(button="late", button_after_steps=40), 4, seed=0)
    vec.reset()
    assert not vec.button_enabled and not vec.state.button_on.any()
    for _ in range(10):
        vec.step(np.zeros(4, np.int64))
    assert vec.button_enabled and vec.total_steps == 40
    vec.reset()
    assert vec.state.button_on.all()
    vec.set_button(False)
    vec.reset()
    vec.step(np.zeros(4, np.int64))
    assert not vec.state.button_on.any()


def test_render_draws_the_room() -> None:
    env = TrashWorld(render_mode="ansi")
    env.reset(options={"layout": Layout(agent=(0, 0), can=(1, 1), trash=((0, 1),),
                                        wall_blue=True)})
    assert env.render().splitlines()[:3] == ["~~~~~~~", "~AT...~", "~.C...~"]
