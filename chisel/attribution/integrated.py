"""Integrated: integrated gradients in parameter space along each update, split over features.

Per parameter A = Σ Δθ ⊙ ḡ, with ḡ the path-averaged gradient; Σ A = m(θ_{t+1}) − m(θ_t) up to
quadrature error (reported per step). A Linear weight's share ⟨ΔW, ḡ_W⟩ splits exactly over the
features at its input: decompose every input x = Σ_j c_j d_j + r with least-squares coefficients
on the feature span (c = Eᵀx, E = Dᵀ(DDᵀ)⁺), so the update splits as ΔW = Σ_j ΔW d_j e_jᵀ + ΔW(I − P)
and each part gets ⟨part, ḡ_W⟩; features + residual + the bias's share = the layer's share.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from chisel.attribution import ledger as L
from chisel.attribution.geometry import FeatureBlock
from chisel.attribution.quadrature import PathIntegral


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


def feature_split_rows(
    step: int,
    param: str,
    bias: str | None,
    update: Tensor,
    gbar: Tensor,
    bias_share: float | None,
    ins: FeatureBlock,
) -> list[dict[str, Any]]:
    """The layer's share split over its input features; `update`, `gbar` are [out, in]."""
    dirs, dual = ins.directions, ins.dual()  # [F, in], [in, F]
    shares = ((update @ dirs.T) * (gbar @ dual)).sum(0)  # [F]: ⟨ΔW d_j e_jᵀ, ḡ⟩
    off_span = update - update @ ins.projector()
    site = ins.sites[0]
    rows = [
        L.row(step, L.INTEGRATED, param, s, name, L.ATTRIBUTION, v)
        for name, s, v in zip(ins.names, ins.sites, shares.tolist())
    ]
    rows.append(L.row(step, L.INTEGRATED, param, site, L.RESIDUAL, L.ATTRIBUTION, float((off_span * gbar).sum())))
    if bias is not None and bias_share is not None:
        rows.append(L.row(step, L.INTEGRATED, bias, site, L.BIAS, L.ATTRIBUTION, bias_share))
    return rows
