"""The vocabulary of the credit split: its leaves, the horizon's defaults and its error.

    Δθ = weight_decay + Σ samples(gradient) + gradient (unresolved)
         + Σ samples(momentum) + momentum (unresolved) + residual
"""

from __future__ import annotations

from chisel.attribution.optim_replay import GRADIENT, MOMENTUM, RESIDUAL, WEIGHT_DECAY
from chisel.errors import ChiselError

GRADIENT_UNRESOLVED = "gradient (unresolved)"
# ledger quantity: ‖gradient (unresolved)‖ / ‖gradient‖ of a param whose factor modules were not
# all captured at a step (site: the module paths, comma-separated)
NOT_CAPTURED_SHARE = "not_captured_share"
MOMENTUM_UNRESOLVED = "momentum (unresolved)"
# the leaves of the split: each sample-less part once, samples under GRADIENT / MOMENTUM
LEAVES = (WEIGHT_DECAY, GRADIENT, GRADIENT_UNRESOLVED, MOMENTUM, MOMENTUM_UNRESOLVED, RESIDUAL)
# the sample-less leaves, in the order their rows are written
SAMPLE_LESS = (WEIGHT_DECAY, GRADIENT_UNRESOLVED, MOMENTUM_UNRESOLVED, RESIDUAL)
# default horizon: the earlier steps that hold 99% of the momentum buffer's mass. For a constant
# decay β the steps older than s hold a fraction β^(t−1−s) of it, so that is "decay ≥ 1%":
# 44 steps for Adam's β1 = 0.9, 459 for SGD momentum 0.99 (each step's factors are kept in
# memory while within reach; pass `horizon` to bound it). What lies beyond is reported per step.
MAX_HORIZON = 500
MIN_WEIGHT = 1e-2


class CreditError(ChiselError, ValueError):
    """The run or the inputs cannot give the credit split asked for."""
