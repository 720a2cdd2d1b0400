"""Warnings that point at the user's line, however deep inside chisel they are raised."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` with the stack level of the first frame outside chisel (Python 3.12's
    `skip_file_prefixes`, for 3.11): the warning names the user's call, whichever public
    function (attribute, attribute_ray, the validation game…) led to it."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the frame that called us
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
