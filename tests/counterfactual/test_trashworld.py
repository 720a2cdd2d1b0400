"""A short recorded TrashWorld PPO run: removing nothing / everything, and the retraining
harness reproducing the recorded run when it removes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import chisel
from chisel.agents.ppo import PPOConfig
from chisel.counterfactual import counterfactual, episodes, tag_in
from chisel.counterfactual.retrain import (
    Scenario,
    drop_episodes,
    nothing_removed,
    record_base,
    retrain,
)
from chisel.counterfactual.selection import Nothing
from chisel.envs import TrashWorldConfig
from tests.counterfactual.test_exact import _non_sample_sum

PPO = PPOConfig(env=TrashWorldConfig(button="early"), seed=3, total_timesteps=512, num_envs=16,
                num_steps=16, num_minibatches=2, update_epochs=2, hidden=16)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cf") / "run"
    result = record_base(out, PPO, button="early")
    return result, chisel.load(out)


def test_nothing_is_final_and_all_is_initial_plus_non_sample_parts(base):
    result, run = base
    assert len(run) == PPO.num_updates == 8
    agent = {n: p.detach().double() for n, p in result.agent.named_parameters()}
    none = counterfactual(run, remove=None)
    for n, v in agent.items():
        assert torch.equal(none.predicted[n], v)
    every = counterfactual(run, remove="all", horizon=3)
    expected = _non_sample_sum(run, 3)
    for n in expected:
        torch.testing.assert_close(every.predicted[n], expected[n], rtol=0, atol=1e-12)
    # the actor's layers have factors: removing every sample takes most of their change away
    moved = float((agent["pi_out.weight"] - every.initial["pi_out.weight"]).norm())
    left = float((every.predicted["pi_out.weight"] - every.initial["pi_out.weight"]).norm())
    assert left < 0.5 * moved, (left, moved)
    # the critic has no factors: its change is all unresolved and stays
    torch.testing.assert_close(every.predicted["v_out.weight"], agent["v_out.weight"], rtol=0, atol=1e-12)


def test_selections_split_the_samples(base):
    _, run = base
    half = counterfactual(run, remove=episodes(0.5, seed=0), horizon=3)
    other = counterfactual(run, remove=lambda t: ~episodes(0.5, seed=0).chosen(t["episode_id"].numpy()), horizon=3)
    every = counterfactual(run, remove="all", horizon=3)
    assert 0.3 < half.fraction_removed < 0.7
    for n in every.removed:
        torch.testing.assert_close(half.removed[n] + other.removed[n], every.removed[n], rtol=0, atol=1e-12)
    blue = counterfactual(run, remove=tag_in("next_reward_source", 1, wall_blue=1))
    assert 0 <= blue.removed_weight < blue.samples


def test_retraining_with_nothing_removed_reproduces_the_run(base):
    result, _ = base
    _, snaps = retrain(PPO, nothing_removed())
    ones = Scenario("weights of one", Nothing(), sample_weight=lambda labels: np.ones(len(labels["episode_ids"])))
    _, weighted = retrain(PPO, ones)
    for n, p in result.agent.named_parameters():
        assert torch.equal(snaps[PPO.num_updates][n], p.detach().double())
        assert torch.equal(weighted[PPO.num_updates][n], p.detach().double())
    _, dropped = retrain(PPO, drop_episodes(0.5, 0), checkpoints=[4])
    assert set(dropped) == {4, 8}
    assert not torch.equal(dropped[8]["pi_out.weight"], result.agent.pi_out.weight.detach().double())
