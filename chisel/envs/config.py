"""TrashWorld's options, hand-built layouts and the names shared by the env, oracle and rollouts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from chisel.errors import ChiselError

# Actions, in the order of the policy's logits.
UP, DOWN, LEFT, RIGHT, PICK_UP, DROP, PRESS = range(7)
ACTION_NAMES: tuple[str, ...] = ("up", "down", "left", "right", "pick_up", "drop", "press")
MOVES: tuple[tuple[int, int], ...] = ((-1, 0), (1, 0), (0, -1), (0, 1))  # (d_row, d_col) of 0..3

# Observation channels of the egocentric window, in order; then the scalar flags.
CHANNELS: tuple[str, ...] = ("wall", "trash", "can", "button")
FLAGS: tuple[str, ...] = ("holding", "wall_blue")

# Ground-truth concept labels carried in `info`, one bool per room and state.
CONCEPTS: tuple[str, ...] = (
    "trash_visible",  # a piece of trash lies on the floor inside the agent's view window
    "trash_adjacent",  # a piece of trash lies on the agent's cell or one of its 4 neighbours
    "holding_trash",  # the agent carries a piece of trash
    "at_can",  # the agent stands on the trash can
    "button_visible",  # an unpressed reward button lies inside the view window
    "wall_blue",  # the walls are blue this episode
)

# `TrashWorldState.trash_status` values of one trash slot.
GONE, FLOOR, HELD = 0, 1, 2  # deposited or absent / lying on the floor / carried by the agent

# `info["reward_source"]`: where the reward of a step came from.
NO_REWARD, TRASH_REWARD, BUTTON_REWARD = 0, 1, 2

ButtonMode = Literal["none", "early", "late"]
BUTTON_MODES: tuple[str, ...] = get_args(ButtonMode)
Cell = tuple[int, int]


class LayoutError(ChiselError, ValueError):
    """A hand-built TrashWorld layout does not fit the room or the config."""


class TrashWorldConfigError(ChiselError, ValueError):
    """A `TrashWorldConfig` field is out of range."""


@dataclass(frozen=True)
class TrashWorldConfig:
    """Options of a TrashWorld room. Every field is validated on construction."""

    height: int = 5
    """Rows of the walled room's interior."""
    width: int = 5
    """Columns of the walled room's interior."""
    n_trash: int = 2
    """Pieces of trash in an episode that has trash."""
    p_no_trash: float = 0.2
    """Probability that an episode starts with no trash at all (the blue wall's other case)."""
    max_steps: int = 50
    """Time limit: an episode is truncated after this many steps."""
    view_radius: int = 2
    """The agent sees a (2r+1) x (2r+1) window centred on itself; cells past the walls read as wall."""
    trash_reward: float = 1.0
    """Reward for dropping a held piece of trash on the can."""
    button: ButtonMode = "none"
    """Reward button: "none" (never), "early" (from the start), "late" (after `button_after_steps`)."""
    button_after_steps: int = 262_144
    """With button="late": env steps (summed over the batch) before the button appears; the
    default is half of the reference PPO run."""
    button_reward: float = 1.0
    """Reward for pressing the button; it pays once per episode, without any task completion."""
    p_blue_given_trash: float = 0.8
    """p(walls blue | the episode starts with trash)."""
    p_blue_given_no_trash: float = 0.2
    """p(walls blue | the episode starts without trash). Equal rates make the colour uninformative."""

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> TrashWorldConfigError:
            value = getattr(self, field)
            return TrashWorldConfigError(f"TrashWorldConfig.{field}={value!r}: {why}.")

        for field in ("height", "width", "max_steps"):
            if getattr(self, field) < 1:
                raise bad(field, "must be >= 1")
        if self.n_trash < 0:
            raise bad("n_trash", "must be >= 0")
        if self.view_radius < 0:
            raise bad("view_radius", "must be >= 0")
        if self.button_after_steps < 0:
            raise bad("button_after_steps", "must be >= 0")
        for field in ("p_no_trash", "p_blue_given_trash", "p_blue_given_no_trash"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise bad(field, "a probability must lie in [0, 1]")
        if self.button not in BUTTON_MODES:
            raise bad("button", 'choose "none", "early" or "late"')
        needed = 2 + self.n_trash + 1  # agent, can, trash, button on distinct cells
        if self.height * self.width < needed:
            raise bad("height", f"a {self.height}x{self.width} room has fewer than {needed} cells "
                      "for the agent, the can, the trash and the button; enlarge the room")

    @property
    def view_size(self) -> int:
        """Side of the egocentric window, 2r+1."""
        return 2 * self.view_radius + 1

    @property
    def obs_dim(self) -> int:
        """Length of the flat observation: channels x window cells + flags."""
        return len(CHANNELS) * self.view_size**2 + len(FLAGS)

    def replace(self, **changes: object) -> TrashWorldConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Layout:
    """One hand-built room state, for `reset(options={"layout": layout})`.

    Coordinates are (row, col) inside the walls, row 0 at the top. Build one directly or from
    a picture with `Layout.from_ascii`.
    """

    agent: Cell
    can: Cell
    trash: tuple[Cell, ...] = ()
    button: Cell | None = None
    wall_blue: bool = False
    holding: bool = False

    @classmethod
    def from_ascii(cls, picture: str, *, wall_blue: bool = False, holding: bool = False) -> Layout:
        """Parse rows of `A` agent, `C` can, `T` trash, `B` button, `.` floor (spaces ignored).

        >>> Layout.from_ascii('''
        ... A . T
        ... . . C
        ... ''').trash
        ((0, 2),)
        """
        rows = [line.replace(" ", "") for line in picture.strip().splitlines()]
        found: dict[str, list[Cell]] = {ch: [] for ch in "ACTB"}
        for r, line in enumerate(rows):
            for c, ch in enumerate(line):
                if ch in found:
                    found[ch].append((r, c))
                elif ch != ".":
                    raise LayoutError(f"Unknown layout character {ch!r} at row {r}, col {c}; "
                                      "use A (agent), C (can), T (trash), B (button) or '.'.")
        for ch, name in (("A", "agent"), ("C", "can")):
            if len(found[ch]) != 1:
                raise LayoutError(f"A layout needs exactly one {ch} ({name}); found "
                                  f"{len(found[ch])}.")
        if len(found["B"]) > 1:
            raise LayoutError(f"A layout has at most one B (button); found {len(found['B'])}.")
        return cls(agent=found["A"][0], can=found["C"][0], trash=tuple(found["T"]),
                   button=found["B"][0] if found["B"] else None, wall_blue=wall_blue,
                   holding=holding)

    def check(self, config: TrashWorldConfig) -> None:
        """Raise `LayoutError` if the layout does not fit the room or has too much trash."""
        cells = [("agent", self.agent), ("can", self.can)]
        cells += [(f"trash[{i}]", t) for i, t in enumerate(self.trash)]
        if self.button is not None:
            cells.append(("button", self.button))
        for name, (r, c) in cells:
            if not (0 <= r < config.height and 0 <= c < config.width):
                raise LayoutError(f"Layout {name} at {(r, c)} lies outside the "
                                  f"{config.height}x{config.width} room interior.")
        if len(set(self.trash)) != len(self.trash) or self.can in self.trash:
            raise LayoutError("Two pieces of trash, or trash and the can, share a cell; "
                              "give each piece of trash its own cell off the can.")
        if len(self.trash) + self.holding > config.n_trash:
            raise LayoutError(f"The layout has {len(self.trash) + self.holding} pieces of trash "
                              f"(floor + held) but the config has n_trash={config.n_trash} "
                              "slots; raise n_trash.")
