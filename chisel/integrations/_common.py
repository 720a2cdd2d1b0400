"""What every integration shares: its error class and the check for an optional dependency."""

from __future__ import annotations

import importlib
from types import ModuleType

from chisel.errors import ChiselError


class IntegrationError(ChiselError, ValueError):
    """A training library's object cannot be recorded the way the integration was asked to."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import `module`, or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the `{module}` package, which is not installed here ({err}). "
            f"Install it with `pip install 'chisel-rl[{extra}]'`."
        ) from err
