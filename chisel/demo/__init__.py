"""`chisel demo`: the whole pipeline on TrashWorld (train, record, probe, attribute, report)."""

from chisel.demo.config import DemoConfig, DemoConfigError
from chisel.demo.pipeline import run_demo

__all__ = ["DemoConfig", "DemoConfigError", "run_demo"]
