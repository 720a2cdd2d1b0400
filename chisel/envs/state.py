"""The state of a batch of TrashWorld rooms (plain arrays; the simulator steps it)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from chisel.envs.config import HELD


@dataclass
class TrashWorldState:
    """The full state of N rooms. Positions are (row, col) inside the walls."""

    agent: np.ndarray  # [N, 2] int64
    can: np.ndarray  # [N, 2] int64
    trash: np.ndarray  # [N, K, 2] int64, K = config.n_trash slots
    trash_status: np.ndarray  # [N, K] int8: GONE (deposited / absent), FLOOR, HELD
    button: np.ndarray  # [N, 2] int64
    button_on: np.ndarray  # [N] bool: the button is in the room and not yet pressed
    wall_blue: np.ndarray  # [N] bool
    t: np.ndarray  # [N] int64 steps taken this episode
    episode_id: np.ndarray  # [N] int64, unique within one VecTrashWorld

    @property
    def holding(self) -> np.ndarray:
        """[N] bool: the agent carries trash."""
        return (self.trash_status == HELD).any(axis=1)

    def copy(self) -> TrashWorldState:
        return TrashWorldState(**{f.name: getattr(self, f.name).copy() for f in fields(self)})

    def room(self, i: int) -> TrashWorldState:
        """The state of room i alone, as a batch of one."""
        return TrashWorldState(**{f.name: getattr(self, f.name)[i : i + 1].copy()
                                  for f in fields(self)})
