"""Stage 1: train the reference PPO agent inside `chisel.record`, tagging every minibatch.

Tags (one value per sample, for credit): advantage (raw GAE), reward, reward_source and
next_reward_source (0 none, 1 trash, 2 button), advantage_sign (+1 / -1), episode_id, wall_blue
(1 / 0).
"""

from __future__ import annotations

import numpy as np

import chisel
from chisel.agents.ppo import (
    MinibatchInfo,
    PPOConfig,
    TrainResult,
    UpdateStats,
    make_agent,
    make_optimizer,
    train,
)
from chisel.demo.config import FACTOR_MODULES, DemoConfig
from chisel.envs import TrashWorldConfig


def ppo_config(cfg: DemoConfig) -> PPOConfig:
    """The reference PPO run; a late button appears halfway through training."""
    env = TrashWorldConfig(button=cfg.button, button_after_steps=cfg.total_timesteps // 2)
    return PPOConfig(
        env=env,
        seed=cfg.seed,
        total_timesteps=cfg.total_timesteps,
        num_envs=cfg.num_envs,
        learning_rate=cfg.learning_rate,
    )


def train_recorded(cfg: DemoConfig, ppo: PPOConfig) -> tuple[TrainResult, list[dict]]:
    """Train inside `chisel.record`, tagging each minibatch; returns the run and its curve."""
    agent = make_agent(ppo)
    optimizer = make_optimizer(agent, ppo)
    curve: list[dict] = []
    rewards = np.zeros(3)  # reward of the current rollout by source (none, trash, button)

    def before_step(mb: MinibatchInfo) -> None:
        adv = mb.advantages
        rec.tag(
            advantage=adv,
            reward=mb.rewards,
            reward_source=mb.reward_source,
            next_reward_source=mb.next_reward_source,
            advantage_sign=np.where(adv >= 0, 1.0, -1.0),
            episode_id=mb.episode_ids,
            wall_blue=mb.concepts["wall_blue"].astype(np.float64),  # counterfactual scenarios
        )
        if mb.epoch == 0:  # epoch 0's minibatches cover the rollout once
            np.add.at(rewards, mb.reward_source.astype(np.int64), mb.rewards)

    def on_update(u: UpdateStats) -> None:
        ret = u.mean_return if np.isfinite(u.mean_return) else None
        total = rewards[1:].sum()
        share = rewards / total if total else np.zeros(3)
        curve.append(
            {
                "update": u.optimizer_steps,
                "env_steps": u.global_env_step,
                "mean_return": ret,
                "reward_trash": None if ret is None else ret * float(share[1]),
                "reward_button": None if ret is None else ret * float(share[2]),
                "seconds": round(u.seconds, 2),
            }
        )
        rewards[:] = 0

    meta = {
        "demo": cfg.to_json(),
        "ppo": {"total_timesteps": ppo.total_timesteps, "seed": ppo.seed, "button": cfg.button},
    }
    with chisel.record(
        agent,
        optimizer,
        cfg.out,
        factors=list(FACTOR_MODULES),
        factor_dtype="bfloat16",
        factors_every=cfg.factors_every,
        overwrite=True,
        metadata=meta,
    ) as rec:
        result = train(
            ppo, agent=agent, optimizer=optimizer, before_step=before_step, on_update=on_update
        )
    return result, curve
