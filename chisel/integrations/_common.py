"""What every integration shares: its error class, the check for an optional dependency
(`_require`), the check of the options passed on to `chisel.record`, instance patches that undo
cleanly, and the way a callback stops recording."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from chisel.errors import ChiselError
from chisel.integrations._require import require  # noqa: F401  (re-exported to the callbacks)

_NOT_OPTIONS = {"model", "optimizer", "run_dir", "scaler"}
_MISSING = object()


class IntegrationError(ChiselError, ValueError):
    """A training library's object cannot be recorded the way the integration was asked to."""


def check_options(options: dict[str, Any]) -> None:
    """Refuse options a callback would pass on to `chisel.record` that it does not take."""
    from chisel.recorder import record

    allowed = [n for n in inspect.signature(record).parameters if n not in _NOT_OPTIONS]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"ChiselCallback got unknown record options {unknown}; it passes these on to "
            f"chisel.record: {allowed}."
        )


def patch(obj: Any, name: str, wrap: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Set `obj.<name>` on the instance to `wrap(current)`; return the undo (which restores the
    instance attribute there was, if any, and only while ours is still in place)."""
    saved = obj.__dict__.get(name, _MISSING)
    mine = wrap(getattr(obj, name))
    setattr(obj, name, mine)

    def undo() -> None:
        if obj.__dict__.get(name) is not mine:
            return  # replaced by someone else since: leave theirs
        if saved is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, saved)

    return undo


def stop(undo: list[Callable[[], None]], recorder: Any) -> None:
    """Undo a callback's patches (last first), then close its recorder (even if an undo fails)."""
    try:
        for step in reversed(undo):
            step()
    finally:
        if recorder is not None:
            recorder.close()
