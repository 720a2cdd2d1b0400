"""TrashWorld registered with Gymnasium on request: make with options, check_env clean."""

from __future__ import annotations

import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import chisel.envs
from chisel.envs import (
    TrashWorld,
    TrashWorldConfig,
    TrashWorldConfigError,
    TrashWorldVectorEnv,
    VecTrashWorld,
)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"button": "early"},
        {"button": "late", "button_after_steps": 10},
        {"p_blue_given_trash": 0.5, "p_blue_given_no_trash": 0.5, "render_mode": "ansi"},
        {"render_mode": "rgb_array"},  # what SB3's make_vec_env asks for
    ],
)
def test_make_with_options_passes_check_env(options):
    env_id = chisel.envs.register()
    assert env_id == chisel.envs.ENV_ID == "chisel/TrashWorld-v0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every Gymnasium warning fails the test
        env = gymnasium.make(env_id, **options)
        config = {k: v for k, v in options.items() if k != "render_mode"}
        assert env.unwrapped.config == TrashWorldConfig(**config)
        check_env(env.unwrapped)
        obs, _ = env.reset(seed=0)  # through make's checking wrappers too
        env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)


def test_register_is_idempotent_and_takes_a_config():
    env_id = chisel.envs.register()
    assert chisel.envs.register() == env_id
    config = TrashWorldConfig(height=6, width=4, button="early")
    env = gymnasium.make(env_id, config=config, p_no_trash=0.0)
    assert env.unwrapped.config == config.replace(p_no_trash=0.0)
    vec = gymnasium.make_vec(env_id, num_envs=3, vectorization_mode="sync", button="early")
    assert vec.reset(seed=0)[0].shape == (3, config.replace(height=5, width=5).obs_dim)


def test_unknown_option_names_the_fields():
    with pytest.raises(TrashWorldConfigError, match="unknown options \\['buton'\\].*button"):
        TrashWorld(buton="early")



def test_rgb_picture_shows_the_room():
    env = TrashWorld(TrashWorldConfig(p_blue_given_trash=1.0, p_no_trash=0.0), render_mode="rgb_array")
    env.reset(seed=0)
    picture = env.render()
    cfg = env.config
    assert picture.dtype == np.uint8 and picture.shape == ((cfg.height + 2) * 8, (cfg.width + 2) * 8, 3)
    assert tuple(picture[0, 0]) == (60, 90, 200)  # a blue wall
    r, c = env.state.agent[0]
    assert tuple(picture[(r + 1) * 8, (c + 1) * 8]) == (20, 20, 20)  # the agent


def test_make_vec_gives_the_batched_vector_env():
    env = gymnasium.make_vec(chisel.envs.register(), num_envs=6, button="early")
    assert isinstance(env.unwrapped, TrashWorldVectorEnv) and env.unwrapped.config.button == "early"
    reference = VecTrashWorld(TrashWorldConfig(button="early"), num_envs=6, seed=3)
    obs, info = env.reset(seed=3)
    np.testing.assert_array_equal(obs, reference.reset()[0])
    assert env.observation_space.contains(obs) and info["_trash_visible"].all()
    returns, lengths, finished = np.zeros(6), np.zeros(6, int), 0
    for actions in np.random.default_rng(0).integers(0, 7, (120, 6)):
        obs, reward, terminated, truncated, info = env.step(actions)
        ref_obs, ref_reward, *_ , ref_info = reference.step(actions)
        np.testing.assert_array_equal(obs, ref_obs)
        np.testing.assert_array_equal(reward, ref_reward)
        returns, lengths = returns + reward, lengths + 1
        done = terminated | truncated
        if done.any():
            np.testing.assert_array_equal(info["_final_obs"], done)
            np.testing.assert_array_equal(info["_episode"], done)
            for i in np.flatnonzero(done):
                np.testing.assert_array_equal(info["final_obs"][i], ref_info["final_obs"][i])
                assert info["episode"]["r"][i] == returns[i] and info["episode"]["l"][i] == lengths[i]
            assert all(info["final_obs"][i] is None for i in np.flatnonzero(~done))
            returns[done], lengths[done], finished = 0, 0, finished + int(done.sum())
    assert finished > 6  # truncations at max_steps=50 at least
    assert env.metadata["autoreset_mode"].value == "SameStep"
    stats = gymnasium.wrappers.vector.RecordEpisodeStatistics(env)
    stats.reset(seed=0)
    stats.step(stats.action_space.sample())
