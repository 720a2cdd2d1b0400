"""Step indices: what a step number may be, and which steps of a run are visible."""

from __future__ import annotations

import operator
from typing import Any

from chisel import _names as N
from chisel.errors import StepTypeError
from chisel.store.layout import RunLayout


def as_step(t: Any, what: str = "step") -> int:
    """An int from a Python int, a numpy integer or a 0-d integer tensor; bools, floats, strings
    and tensors of several values are a `StepTypeError` (True is not step 1)."""
    dtype = getattr(t, "dtype", None)
    is_bool = isinstance(t, bool) or str(dtype) in ("bool", "torch.bool")
    if not is_bool:
        try:
            return operator.index(t)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise StepTypeError(
        f"{what} {t!r} is a {type(t).__name__}"
        + (f" of dtype {dtype}" if dtype is not None else "")
        + ", not an integer. Give an int (numpy integers and 0-d integer tensors work too)"
        + (", e.g. int('1')." if isinstance(t, str) else ".")
    )


def visible_steps(layout: RunLayout) -> tuple[int, list[int]]:
    """(n, later): steps 0..n-1 are visible without a gap; `later` are step files after a gap.

    The writer renames step files in order, so a gap means files were deleted or lost. A
    directory listing that runs while the writer renames may miss the newest file only; a gap is
    confirmed by listing twice."""
    for _ in range(2):
        numbers = layout.numbers(N.STEPS_DIR)
        n = 0
        for number in numbers:
            if number != n:
                break
            n += 1
        later = numbers[n:]
        if not later:
            return n, []
    return n, later


def gap_message(root: Any, n: int, later: list[int]) -> str:
    first = later[0]
    missing = f"step {n}" if first == n + 1 else f"steps {n}..{first - 1}"
    return (
        f"{root}: the step file of {missing} is missing while {len(later)} later step files "
        f"({first}..{later[-1]}) exist, so the run reads as {n} steps and the later ones are not "
        "reachable. The files were deleted or lost: restore them from a copy, or re-record; "
        "`chisel verify RUN_DIR` lists every problem."
    )
