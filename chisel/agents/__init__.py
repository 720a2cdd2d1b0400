"""Reference agents: PPO on TrashWorld with a TransformerLens-hooked policy."""

from chisel.agents.ppo import (
    MinibatchInfo,
    PPOConfig,
    PPOConfigError,
    TrainResult,
    TrashAgent,
    UpdateStats,
    agent_policy,
    make_agent,
    make_optimizer,
    train,
)

__all__ = [
    "MinibatchInfo",
    "PPOConfig",
    "PPOConfigError",
    "TrainResult",
    "TrashAgent",
    "UpdateStats",
    "agent_policy",
    "make_agent",
    "make_optimizer",
    "train",
]
