"""Integrated: integrated gradients in parameter space along each update, split over features.

Per parameter A = Σ Δθ ⊙ ḡ, with ḡ the path-averaged gradient; Σ A = m(θ_{t+1}) − m(θ_t) up to
quadrature error (reported per step). A Linear weight's share ⟨ΔW, ḡ_W⟩ splits exactly over the
features at its input (features + <mean> + <residual> = the weight's share; the bias keeps its
own <bias> row) and, separately, over the features at its output; see `splits` for the kernels.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from chisel.attribution import ledger as L
from chisel.attribution.quadrature import PathIntegral
from chisel.attribution.splits import Kernels
from chisel.attribution.weights import LinearWeight


def param_rows(step: int, delta: dict[str, Tensor], path: PathIntegral) -> list[dict[str, Any]]:
    rows = []
    total = 0.0
    for name, d in delta.items():
        value = float((d * path.gbar[name]).sum())
        total += value
        rows.append(L.row(step, L.INTEGRATED, name, "", L.WHOLE, L.ATTRIBUTION, value))
    delta_m = path.m_end - path.m_start
    error = total - delta_m
    scale = max(abs(delta_m), abs(total), 1e-300)
    for quantity, value in (
        (L.METRIC_BEFORE, path.m_start),
        (L.DELTA_METRIC, delta_m),
        (L.TOTAL, total),
        (L.COMPLETENESS_ERROR, error),
        (L.COMPLETENESS_REL, abs(error) / scale if total or delta_m else 0.0),
        (L.PIECES, path.pieces),
        (L.EVALUATIONS, path.evaluations),
    ):
        rows.append(L.row(step, L.INTEGRATED, "", "", L.WHOLE, quantity, value))
    return rows


def kernel_rows(
    step: int, w: LinearWeight, delta: dict[str, Tensor], kernels: Kernels
) -> list[dict[str, Any]]:
    """Rows of one side's split: ⟨ΔW, R_k⟩ per kernel (and ⟨Δb, r_k⟩ when the bias is split)."""
    rows = [
        L.row(step, L.INTEGRATED, w.param, site, name, kernels.quantity, v)
        for name, site, v in zip(
            kernels.labels, kernels.sites, kernels.shares(w.matrix(delta[w.param])).tolist()
        )
    ]
    if kernels.bias is not None and w.bias is not None:
        values = kernels.bias_shares(delta[w.bias]).tolist()
        rows += [
            L.row(step, L.INTEGRATED, w.bias, site, name, kernels.quantity, v)
            for name, site, v in zip(kernels.labels, kernels.sites, values)
        ]
    return rows


def bias_row(step: int, w: LinearWeight, site: str, delta: dict[str, Tensor], gbar: dict[str, Tensor]) -> dict:
    """The bias's whole share as the input side's "<bias>" row."""
    value = float((delta[w.bias] * gbar[w.bias]).sum())
    return L.row(step, L.INTEGRATED, w.bias, site, L.BIAS, L.ATTRIBUTION, value)
