"""`chisel demo`: the whole pipeline on TrashWorld (train, record, probe, attribute, report).

Names are imported on first use, so that the report can import the demo's report sections
(`chisel.demo.report_sections`) without the training pipeline.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DemoConfig": "chisel.demo.config",
    "DemoConfigError": "chisel.demo.config",
    "run_demo": "chisel.demo.pipeline",
}
__all__ = ["DemoConfig", "DemoConfigError", "run_demo"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'chisel.demo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
