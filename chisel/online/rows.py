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
from chisel.attribution.splits import Kernels
from chisel.online.writer import FIRST_ORDER, ORDER


def kernels(binding: Binding, grad_m: dict[str, Tensor],
            means: dict[str, Tensor]) -> dict[str, list[Kernels]]:
    """{weight param: [input side, output side]} from ∇m(θ_t), as `Binding.kernels` builds them
    from ḡ; `means`: {module: x̄ [in]} over the metric's states at θ_t (centred split)."""
    return binding.kernels_at(grad_m, means)


def geometry(t: int, binding: Binding, theta: dict[str, Tensor],
             delta: dict[str, Tensor]) -> list[dict[str, Any]]:
    """Exact: the offline geometry family's rows (`geometry.geometry_rows`), with the span shares
    from F×F Gram matrices instead of a [d, d] projector (O(out·in·F) per weight, not O(d³))."""
    rows = []
    for param, (ins, outs) in binding.blocks.items():
        w = binding.by_param[param]
        outs = None if outs is not None and outs.carried else outs
        if ins is None and outs is None:
            continue
        dw = w.matrix(delta[param]).double()  # [out, in]
        norm2 = float((dw**2).sum())
        if ins is not None:
            d = ins.directions  # [F, in]
            reads = torch.linalg.vector_norm(dw @ d.T, dim=0)
            rows += [L.row(t, L.GEOMETRY, param, site, name, L.READ, v)
                     for name, site, v in zip(ins.names, ins.sites, reads.tolist())]
            rows.append(L.row(t, L.GEOMETRY, param, ins.sites[0], L.SPAN, L.SPAN_SHARE,
                              _span_share(dw @ ins.dual(), d, norm2)))  # ‖ΔW E D‖²
        if outs is not None:
            u = outs.directions  # [K, out]
            writes = torch.linalg.vector_norm(u @ dw, dim=1)
            rows += [L.row(t, L.GEOMETRY, param, site, name, L.WRITE, v)
                     for name, site, v in zip(outs.names, outs.sites, writes.tolist())]
            rows.append(L.row(t, L.GEOMETRY, param, outs.sites[0], L.SPAN, L.SPAN_SHARE,
                              _span_share((outs.dual().T @ dw).T, u, norm2)))  # ‖Dᵀ Eᵀ ΔW‖²
        if ins is not None and outs is not None:
            circuit = u @ dw @ ins.directions.T  # [K, F]
            base = (u @ w.matrix(theta[param]).double() @ ins.directions.T).abs()
            rel = torch.where(base > 0, circuit / base, torch.full_like(circuit, float("nan")))
            for k, (out_name, out_site) in enumerate(zip(outs.names, outs.sites)):
                for j, (in_name, in_site) in enumerate(zip(ins.names, ins.sites)):
                    site, feature = f"{in_site}{L.ARROW}{out_site}", f"{in_name}{L.ARROW}{out_name}"
                    rows.append(L.row(t, L.GEOMETRY, param, site, feature, L.CIRCUIT, circuit[k, j]))
                    rows.append(L.row(t, L.GEOMETRY, param, site, feature, L.CIRCUIT_REL, rel[k, j]))
    return rows


def _span_share(a: Tensor, d: Tensor, norm2: float) -> float:
    """‖A D‖²_F / norm2 = Σ (AᵀA) ∘ (DDᵀ) / norm2, for A [n, F] and D [F, d]."""
    return float(((a.T @ a) * (d @ d.T)).sum()) / norm2 if norm2 else float("nan")


def site_of(binding: Binding) -> dict[str, str]:
    """{weight param: the site its whole-sample credit rows name} (as the offline credit)."""
    return {p: (ins or outs).sites[0] for p, (ins, outs) in binding.blocks.items()}


def first_order(t: int, binding: Binding, delta: dict[str, Tensor], grad_m: dict[str, Tensor],
                means: dict[str, Tensor]) -> tuple[list[dict[str, Any]], float]:
    """Per param ⟨Δθ, ∇m(θ_t)⟩ and its split over features; returns (rows, their total).

    The shares are ⟨ΔW, R_k⟩ for the kernels R_k of `splits` with ḡ → ∇m(θ_t), computed from
    F-column products without building the [K, out, in] kernels:
    input side ⟨ΔW, (ḡ−M) e_j d_jᵀ⟩ = Σ_o (ΔW d_j)_o ((ḡ−M) e_j)_o, <mean> ⟨ΔW, M⟩ = ḡ_bᵀ ΔW x̄;
    output side ⟨ΔW, f_k u_kᵀ ḡ⟩ = Σ_i (f_kᵀ ΔW)_i (u_kᵀ ḡ)_i; <residual> the rest of the share.
    """
    rows, total = [], 0.0
    for name, d in delta.items():
        value = float((d * grad_m[name]).sum())
        total += value
        rows.append(L.row(t, L.INTEGRATED, name, "", L.WHOLE, L.ATTRIBUTION, value))
    for param, (ins, outs) in binding.blocks.items():
        w = binding.by_param[param]
        g, dw = w.matrix(grad_m[param]).double(), w.matrix(delta[param]).double()  # [out, in]
        whole = float((g * dw).sum())
        gb = grad_m[w.bias].double() if w.bias else None
        if ins is not None:
            xbar = means.get(w.module) if gb is not None else None
            centred = g if xbar is None else g - torch.outer(gb, xbar.double())
            feats = ((dw @ ins.directions.T) * (centred @ ins.dual())).sum(0).tolist()  # [F]
            extra = [] if xbar is None else [(L.MEAN, float(gb @ dw @ xbar.double()))]
            extra.append((L.RESIDUAL, whole - sum(v for _, v in extra) - sum(feats)))
            rows += _split(t, param, ins.names, ins.sites, feats, extra, L.ATTRIBUTION)
            if w.bias is not None:
                value = float((delta[w.bias] * grad_m[w.bias]).sum())
                rows.append(L.row(t, L.INTEGRATED, w.bias, ins.sites[0], L.BIAS, L.ATTRIBUTION, value))
        if outs is not None:
            u, f = outs.directions, outs.dual()  # [K, out], [out, K]
            feats = ((f.T @ dw) * (u @ g)).sum(1).tolist()
            rows += _split(t, param, outs.names, outs.sites, feats,
                           [(L.RESIDUAL, whole - sum(feats))], L.WRITE_ATTRIBUTION)
            if gb is not None:
                db = delta[w.bias].double()
                feats = ((f.T @ db) * (u @ gb)).tolist()
                rest = float(db @ gb) - sum(feats)
                rows += _split(t, w.bias, outs.names, outs.sites, feats, [(L.RESIDUAL, rest)],
                               L.WRITE_ATTRIBUTION)
    for r in rows:
        r[ORDER] = FIRST_ORDER
    return rows, total


def _split(t, param, names, sites, feats, extra, quantity):
    out = [L.row(t, L.INTEGRATED, param, s, n, quantity, v) for n, s, v in zip(names, sites, feats)]
    return out + [L.row(t, L.INTEGRATED, param, sites[0], n, quantity, v) for n, v in extra]


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
