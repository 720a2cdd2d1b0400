"""One recorded step's factors as credit reads them: float64, the step's coefficient c (clip /
loss scale) folded into G, token ids as int64, and the step's per-sample tags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from chisel.attribution.credit_parts import CreditError
from chisel.capture.factor_kinds import EMBEDDING as EMBEDDING_KIND
from chisel.capture.factor_kinds import NORMS as NORM_KINDS
from chisel.store.reader import Run


@dataclass(frozen=True)
class StepFactors:
    """One step's factors in float64, c folded into G, and its per-sample tags."""

    modules: dict[str, tuple[str, Tensor, Tensor]]  # module -> (kind, X [n,T,in], c·G [n,T,out])
    tags: dict[str, Any]  # name -> 1-D tensor (per sample) or a scalar


def read_factors(run: Run, s: int, kinds: dict[str, str]) -> StepFactors | None:
    """Step s's factors (None for a skipped step or one without a gradient coefficient).

    kinds: {module: factor layout} ("linear" where absent)."""
    record = run.record(s)
    coef = record.grad_coef
    if record.skipped or coef is None:
        return None
    coef = float(coef) / float(record.grads_scaled_by or 1.0)
    modules = {}
    for module, (x, g) in run.factors(s).items():
        kind = kinds.get(module, "linear")
        modules[module] = (kind, *_as_float64(kind, x, g, coef, module, s))
    return StepFactors(modules, run.tags(s))


def _as_float64(
    kind: str, x: Tensor, g: Tensor, coef: float, module: str, s: int
) -> tuple[Tensor, Tensor]:
    """(X, c·G) of one module in the layout of its kind: [n, T, in] and [n, T, out]; an
    embedding's X is ids [n, T]; a norm's both are per-sample sums [n, 1, numel], both times c."""
    n = x.shape[0]
    g64 = g.to(torch.float64).reshape(n, -1, g.shape[-1]) * coef  # [n, T, out]
    if kind == EMBEDDING_KIND:
        x64 = _token_ids(x, module, s).reshape(n, -1)  # [n, T]
    elif kind in NORM_KINDS:  # both are per-sample sums of gradient terms: both get c
        x64 = x.to(torch.float64).reshape(n, 1, -1) * coef
        g64 = g64.reshape(n, 1, -1)
    else:
        x64 = x.to(torch.float64).reshape(n, -1, x.shape[-1])  # [n, T, in]
    return x64, g64


def _token_ids(x: Tensor, module: str, s: int) -> Tensor:
    """An embedding's stored ids as int64; ids cast to a compact float `factor_dtype` are exact
    only up to 2^(mantissa bits + 1) (bfloat16: 256), so larger ones are refused."""
    if not x.is_floating_point():
        return x.long()
    limit = int(2 / torch.finfo(x.dtype).eps)  # 2^(mantissa bits + 1)
    if x.numel() and (bool((x != x.round()).any()) or float(x.abs().max()) > limit):
        raise CreditError(
            f"step {s}: the token ids of embedding {module!r} were stored as {x.dtype} (the run's "
            f"factor_dtype), which holds integers exactly only up to {limit}; they are lost. "
            "Record with factor_dtype=None (or float32) to get credit rows for embeddings."
        )
    return x.long()
