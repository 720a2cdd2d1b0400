"""`chisel demo --lm`: GRPO on a tiny random-init GPT-2 whose reward has a spurious correlate
(train, record, probes + SAE, attribute, validate, report)."""

from chisel.demo_lm.config import LMDemoConfig, LMDemoConfigError
from chisel.demo_lm.pipeline import run_lm_demo

__all__ = ["LMDemoConfig", "LMDemoConfigError", "run_lm_demo"]
