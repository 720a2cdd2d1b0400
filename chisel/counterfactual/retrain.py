"""Ground truth: retrain the TrashWorld demo with some reward removed, from the same seeds.

Each `Scenario` pairs what the prediction removes (a selection of recorded samples) with how
the retraining removes it (an env change, a reward filter, or a per-sample loss weight):

- `button_never_pays`: retrain with button_reward = 0; predict by removing the samples whose
  advantage is about the button (tag next_reward_source == 2: the first reward ahead in the
  episode is the button's).
- `no_trash_reward_when_blue`: retrain with trash rewards zeroed in blue-walled episodes;
  predict by removing the samples with next_reward_source == 1 and wall_blue == 1.
- `drop_episodes(fraction, seed)`: retrain with those episodes' samples weighted 0 in every
  loss (the minibatch mean still divides by B); predict by removing the same episodes' samples.
  This one is closest to what a first-order removal means: same rule, only on-policy drift.

The same seeds give the same initial θ, rooms, action sampling and minibatch order; after the
first update the retrained agent collects its own data (the part no first-order method sees).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chisel.agents.ppo import (
    PPOConfig,
    TrainResult,
    UpdateStats,
    make_agent,
    make_optimizer,
    train,
)
from chisel.counterfactual.selection import Episodes, Nothing, Selection, episodes, tag_in
from chisel.demo.config import DemoConfig
from chisel.demo.train import train_recorded

Params = dict[str, torch.Tensor]
BUTTON, TRASH = 2, 1  # reward_source codes


@dataclass(frozen=True)
class Scenario:
    """One removal, as predicted (`remove`) and as retrained (the other fields)."""

    name: str
    remove: Selection
    env_changes: dict[str, Any] = field(default_factory=dict)
    reward_filter: Callable[[dict], np.ndarray] | None = None
    sample_weight: Callable[[dict], np.ndarray] | None = None


def button_never_pays() -> Scenario:
    return Scenario("button never pays", tag_in("next_reward_source", BUTTON),
                    env_changes={"button_reward": 0.0})


def _zero_trash_when_blue(labels: dict) -> np.ndarray:
    blue_trash = (labels["reward_source"] == TRASH) & labels["wall_blue"].astype(bool)
    return np.where(blue_trash, 0.0, labels["rewards"])


def no_trash_reward_when_blue() -> Scenario:
    return Scenario("no trash reward when the wall is blue",
                    tag_in("next_reward_source", TRASH, wall_blue=1),
                    reward_filter=_zero_trash_when_blue)


@dataclass(frozen=True)
class _DropEpisodes:
    chosen: Episodes

    def __call__(self, labels: dict) -> np.ndarray:
        return 1.0 - self.chosen.chosen(labels["episode_ids"]).astype(np.float64)


def drop_episodes(fraction: float, seed: int) -> Scenario:
    chosen = episodes(fraction, seed)
    return Scenario(f"{fraction:.0%} of episodes dropped (seed {seed})", chosen,
                    sample_weight=_DropEpisodes(chosen))


def nothing_removed() -> Scenario:
    """The control: retraining must reproduce the recorded run exactly."""
    return Scenario("nothing removed", Nothing())


def demo_config(out: Path, *, seed: int, button: str, ppo: PPOConfig) -> DemoConfig:
    """A DemoConfig that records factors on every update (the counterfactual needs them all)."""
    return DemoConfig(out=out, seed=seed, button=button, total_timesteps=ppo.total_timesteps,
                      factors_every=1)


def record_base(out: Path, ppo: PPOConfig, *, button: str) -> TrainResult:
    """Train and record the run the predictions are made from (demo tags, factors every step)."""
    result, _ = train_recorded(demo_config(out, seed=ppo.seed, button=button, ppo=ppo), ppo)
    return result


def retrain(
    ppo: PPOConfig, scenario: Scenario, checkpoints: Sequence[int] = ()
) -> tuple[TrainResult, dict[int, Params]]:
    """Train again from the same seeds with the scenario's removal; θ (float64) after each
    optimizer step count in `checkpoints` that ends a rollout, and at the end."""
    env = dataclasses.replace(ppo.env, **scenario.env_changes)
    cfg = dataclasses.replace(ppo, env=env)
    agent = make_agent(cfg)
    snaps: dict[int, Params] = {}
    wanted = set(checkpoints)

    def on_update(u: UpdateStats) -> None:
        if u.optimizer_steps in wanted:
            snaps[u.optimizer_steps] = _params(agent)

    result = train(cfg, agent=agent, optimizer=make_optimizer(agent, cfg), on_update=on_update,
                   reward_filter=scenario.reward_filter, sample_weight=scenario.sample_weight)
    snaps[cfg.num_updates] = _params(result.agent)
    return result, snaps


def _params(model: torch.nn.Module) -> Params:
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}
