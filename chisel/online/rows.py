"""One step's geometry (exact) and first-order integrated rows.

First-order: the offline ledger's integrated rows are ⟨part, ḡ⟩ with ḡ the metric's gradient
averaged along the update path; online only ∇m(θ_t) at the parameters before the step is known,
so every share is ⟨part, ∇m(θ_t)⟩ (exact when m is linear in θ; the error is second order in Δθ,
reported per step as completeness_error once m(θ_{t+1}) is measured at the next step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from chisel.attribution import ledger as L
from chisel.attribution.binding import Binding
from chisel.attribution.geometry import geometry_rows
from chisel.attribution.integrated import bias_row, kernel_rows
from chisel.attribution.splits import Kernels, read_kernels, write_kernels
from chisel.online.writer import FIRST_ORDER, ORDER


def kernels(binding: Binding, grad_m: dict[str, Tensor],
            means: dict[str, Tensor]) -> dict[str, list[Kernels]]:
    """{weight param: [input side, output side]} from ∇m(θ_t), as `Binding.kernels` builds them
    from ḡ; `means`: {module: x̄ [in]} over the metric's states at θ_t (centred split)."""
    out: dict[str, list[Kernels]] = {}
    for param, (ins, outs) in binding.blocks.items():
        w = binding.by_param[param]
        g = w.matrix(grad_m[param])  # [out, in]
        g_bias = grad_m[w.bias] if w.bias else None
        sides = []
        if ins is not None:
            xbar = means.get(w.module) if g_bias is not None else None
            mean_grad = torch.outer(g_bias, xbar.to(g.dtype)) if xbar is not None else None
            sides.append(read_kernels(ins.names, ins.sites, ins.directions.to(g.dtype), g,
                                      mean_grad, ins.dual().to(g.dtype)))
        if outs is not None:
            sides.append(write_kernels(outs.names, outs.sites, outs.directions.to(g.dtype), g,
                                       g_bias, outs.dual().to(g.dtype)))
        out[param] = sides
    return out


def geometry(t: int, binding: Binding, theta: dict[str, Tensor],
             delta: dict[str, Tensor]) -> list[dict[str, Any]]:
    """Exact: the same rows as the offline geometry family."""
    rows = []
    for param, (ins, outs) in binding.blocks.items():
        w = binding.by_param[param]
        outs = None if outs is not None and outs.carried else outs
        if ins is not None or outs is not None:
            rows += geometry_rows(t, param, w.matrix(theta[param]).double(),
                                  w.matrix(delta[param]).double(), ins, outs)
    return rows


def first_order(t: int, binding: Binding, delta: dict[str, Tensor], grad_m: dict[str, Tensor],
                sides: dict[str, list[Kernels]]) -> tuple[list[dict[str, Any]], float]:
    """Per param ⟨Δθ, ∇m(θ_t)⟩ and its split over features; returns (rows, their total)."""
    rows, total = [], 0.0
    for name, d in delta.items():
        value = float((d * grad_m[name]).sum())
        total += value
        rows.append(L.row(t, L.INTEGRATED, name, "", L.WHOLE, L.ATTRIBUTION, value))
    for param, ks in sides.items():
        w = binding.by_param[param]
        for k in ks:
            rows += kernel_rows(t, w, delta, k)
        ins = binding.blocks[param][0]
        if ins is not None and w.bias is not None:
            rows.append(bias_row(t, w, ins.sites[0], delta, grad_m))
    for r in rows:
        r[ORDER] = FIRST_ORDER
    return rows, total


def completeness(t: int, m_before: float, m_after: float, total: float) -> list[dict[str, Any]]:
    """Δm (exact, measured) beside the first-order total: their gap is the second-order term."""
    delta_m = m_after - m_before
    error = total - delta_m
    scale = max(abs(delta_m), abs(total), 1e-300)
    exact = [(L.METRIC_BEFORE, m_before), (L.DELTA_METRIC, delta_m)]
    approx = [(L.TOTAL, total), (L.COMPLETENESS_ERROR, error),
              (L.COMPLETENESS_REL, abs(error) / scale if total or delta_m else 0.0)]
    rows = [L.row(t, L.INTEGRATED, "", "", L.WHOLE, q, v) for q, v in exact]
    rows += [{**L.row(t, L.INTEGRATED, "", "", L.WHOLE, q, v), ORDER: FIRST_ORDER} for q, v in approx]
    return rows
