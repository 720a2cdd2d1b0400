"""TrashWorld: the essay's environment (an agent rewarded for putting trash in a can)."""

from chisel.envs.choice import (
    ChoiceResult,
    ChoiceTestError,
    choice_rooms,
    choice_test,
    wilson_interval,
)
from chisel.envs.config import (
    ACTION_NAMES,
    CONCEPTS,
    Layout,
    LayoutError,
    TrashWorldConfig,
    TrashWorldConfigError,
)
from chisel.envs.labels import concept_labels, next_reward_source, return_to_go, reward_within
from chisel.envs.oracle import EvalResult, evaluate, oracle_actions, oracle_policy, oracle_return
from chisel.envs.registration import ENV_ID, register
from chisel.envs.trashworld import TrashWorld, TrashWorldState, VecTrashWorld
from chisel.envs.vector import TrashWorldVectorEnv

__all__ = [
    "ACTION_NAMES",
    "CONCEPTS",
    "ENV_ID",
    "ChoiceResult",
    "ChoiceTestError",
    "EvalResult",
    "Layout",
    "LayoutError",
    "TrashWorld",
    "TrashWorldConfig",
    "TrashWorldConfigError",
    "TrashWorldState",
    "TrashWorldVectorEnv",
    "VecTrashWorld",
    "choice_rooms",
    "choice_test",
    "concept_labels",
    "evaluate",
    "next_reward_source",
    "oracle_actions",
    "oracle_policy",
    "oracle_return",
    "register",
    "return_to_go",
    "reward_within",
    "wilson_interval",
]
