"""The reference PPO agent: hooked policy, the before_step hook point, a learning smoke run."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from transformer_lens.HookedRootModule import HookedRootModule

from chisel.agents import (
    MinibatchInfo,
    PPOConfig,
    PPOConfigError,
    agent_policy,
    make_agent,
    train,
)
from chisel.envs import CONCEPTS, TrashWorldConfig, VecTrashWorld, evaluate, oracle_return

HOOKS = ["hook_obs", "hook_pi_hidden1", "hook_pi_hidden2", "hook_logits",
         "hook_v_hidden1", "hook_v_hidden2", "hook_value"]
# a 3x3 room that always holds one piece of trash: learnable in a few seconds
TINY = PPOConfig(env=TrashWorldConfig(height=3, width=3, n_trash=1, max_steps=20, p_no_trash=0.0),
                 num_envs=64, num_steps=32, total_timesteps=64 * 32 * 4, hidden=32,
                 learning_rate=5e-3, anneal_lr=False, update_epochs=8)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny networks: extra torch threads only contend with each other on a shared CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_config_validation() -> None:
    with pytest.raises(PPOConfigError, match="does not divide"):
        PPOConfig(num_envs=3, num_steps=3, num_minibatches=2)
    with pytest.raises(PPOConfigError, match="less than one rollout"):
        PPOConfig(total_timesteps=10)
    assert PPOConfig().num_updates == 1024
    assert TINY.num_updates == 4 * 8 * 4


def test_policy_is_a_hooked_root_module() -> None:
    agent = make_agent(PPOConfig())
    assert isinstance(agent, HookedRootModule)
    assert sorted(agent.hook_dict) == sorted(HOOKS)
    obs = torch.rand(5, TrashWorldConfig().obs_dim)
    (logits, value), cache = agent.run_with_cache(obs)
    assert logits.shape == (5, 7) and value.shape == (5,)
    assert {k: tuple(v.shape) for k, v in cache.items()} == {
        "hook_obs": (5, 102), "hook_pi_hidden1": (5, 64), "hook_pi_hidden2": (5, 64),
        "hook_logits": (5, 7), "hook_v_hidden1": (5, 64), "hook_v_hidden2": (5, 64),
        "hook_value": (5,)}
    assert sum(p.numel() for p in agent.parameters()) == 2 * (102 * 64 + 64 + 64 * 64 + 64) + (
        64 * 7 + 7) + (64 + 1)
    twin = make_agent(PPOConfig())
    assert all(torch.equal(a, b) for a, b in zip(agent.parameters(), twin.parameters()))


def test_before_step_sees_every_update_before_it_happens() -> None:
    seen: list[MinibatchInfo] = []
    snapshots: list[torch.Tensor] = []

    def before_step(mb: MinibatchInfo) -> None:
        assert result_agent[0].pi_fc1.weight.grad is not None  # gradients are ready
        snapshots.append(result_agent[0].pi_fc1.weight.detach().clone())
        seen.append(mb)

    agent = make_agent(TINY)
    result_agent = [agent]
    result = train(TINY, agent=agent, before_step=before_step)
    assert [mb.step for mb in seen] == list(range(TINY.num_updates))
    assert result.history[-1].optimizer_steps == TINY.num_updates
    # the weights move between consecutive before_step calls: each call precedes one step
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(snapshots))
    b = TINY.minibatch_size
    for mb in seen:
        assert mb.obs.shape == (b, TINY.env.obs_dim) and mb.actions.shape == (b,)
        for arr in (mb.advantages, mb.returns, mb.rewards, mb.reward_source,
                    mb.next_reward_source, mb.episode_ids):
            assert arr.shape == (b,)
        assert set(mb.concepts) == set(CONCEPTS)
        assert np.all((mb.reward_source == 1) == (mb.rewards == 1.0))  # no button here
        assert np.all(mb.next_reward_source[mb.reward_source == 1] == 1)
        # holding flag of the observation agrees with the ground-truth concept
        assert np.array_equal(mb.obs[:, -2].numpy() == 1.0, mb.concepts["holding_trash"])


def test_training_is_seeded() -> None:
    cfg = dataclasses.replace(TINY, total_timesteps=64 * 32 * 2)
    a, b = train(cfg).agent, train(cfg).agent
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_smoke_run_improves_return() -> None:
    cfg = dataclasses.replace(TINY, total_timesteps=64 * 32 * 16)
    env = VecTrashWorld(cfg.env, 64, seed=5)
    gen = torch.Generator().manual_seed(0)
    before = evaluate(agent_policy(make_agent(cfg), generator=gen), env, 4, seed=1).mean_return
    result = train(cfg)
    after = evaluate(agent_policy(result.agent, generator=gen), env, 4, seed=1).mean_return
    oracle = oracle_return(env, 4, seed=1)
    assert before < 0.1 and after > 0.6 * oracle, (before, after, oracle)
    assert result.history[-1].mean_return > result.history[0].mean_return


@pytest.mark.slow
def test_default_config_reaches_80_percent_of_the_oracle() -> None:
    cfg = PPOConfig()
    result = train(cfg)
    env = VecTrashWorld(cfg.env, 128, seed=123)
    gen = torch.Generator().manual_seed(0)
    agent = evaluate(agent_policy(result.agent, generator=gen), env, 8, seed=2).mean_return
    oracle = oracle_return(env, 8, seed=2)
    assert agent >= 0.8 * oracle, (agent, oracle)
