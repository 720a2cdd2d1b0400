"""Geometry: how an update ΔW moved the weights relative to feature directions (no data).

For W (out × in), unit read direction d at its input site and unit direction u at its output:
read(d) = ‖ΔW d‖, write(u) = ‖uᵀ ΔW‖, circuit(d→u) = uᵀ ΔW d (signed: stronger or weaker),
circuit_rel = circuit / |uᵀ W d|, span_share = ‖ΔW P‖²_F / ‖ΔW‖²_F (P: projection on the span).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from chisel.attribution import ledger as L
from chisel.attribution.splits import dual


@dataclass(frozen=True)
class FeatureBlock:
    """Features at one side of a weight: names, their sites and unit directions [F, d]."""

    names: tuple[str, ...]
    sites: tuple[str, ...]
    directions: Tensor  # [F, d], unit rows, float64
    # set for output features carried back through an activation (see `transport`): the block's
    # directions are then ũ (not unit) and its duals f̃ [d, F]; geometry leaves such blocks out
    duals: Tensor | None = None

    @property
    def carried(self) -> bool:
        return self.duals is not None

    def projector(self) -> Tensor:
        """Orthogonal projection onto the span of the directions: [d, d] (computed once)."""
        if "_projector" not in self.__dict__:
            self.__dict__["_projector"] = self._least_squares_dual() @ self.directions
        return self.__dict__["_projector"]

    def dual(self) -> Tensor:
        """E = Dᵀ (D Dᵀ)⁺ [d, F]: least-squares coefficients c = Eᵀ x, with Σ_j c_j d_j = P x
        (the given duals for a carried block). Computed once per block, not per step."""
        return self.duals if self.duals is not None else self._least_squares_dual()

    def _least_squares_dual(self) -> Tensor:
        if "_dual" not in self.__dict__:  # frozen dataclass: cache beside the fields
            self.__dict__["_dual"] = dual(self.directions)
        return self.__dict__["_dual"]


def geometry_rows(
    step: int, param: str, weight: Tensor, update: Tensor, ins: FeatureBlock | None, outs: FeatureBlock | None
) -> list[dict[str, Any]]:
    """Rows for one weight; `weight` and `update` are [out, in]."""
    rows = []
    norm2 = float((update**2).sum())
    if ins is not None:
        reads = torch.linalg.vector_norm(update @ ins.directions.T, dim=0)  # [F_in]
        for name, site, value in zip(ins.names, ins.sites, reads.tolist()):
            rows.append(L.row(step, L.GEOMETRY, param, site, name, L.READ, value))
        share = float(((update @ ins.projector()) ** 2).sum()) / norm2 if norm2 else float("nan")
        rows.append(L.row(step, L.GEOMETRY, param, ins.sites[0], L.SPAN, L.SPAN_SHARE, share))
    if outs is not None:
        writes = torch.linalg.vector_norm(outs.directions @ update, dim=1)  # [F_out]
        for name, site, value in zip(outs.names, outs.sites, writes.tolist()):
            rows.append(L.row(step, L.GEOMETRY, param, site, name, L.WRITE, value))
        share = float(((outs.projector() @ update) ** 2).sum()) / norm2 if norm2 else float("nan")
        rows.append(L.row(step, L.GEOMETRY, param, outs.sites[0], L.SPAN, L.SPAN_SHARE, share))
    if ins is not None and outs is not None:
        circuit = outs.directions @ update @ ins.directions.T  # [F_out, F_in]
        base = (outs.directions @ weight @ ins.directions.T).abs()
        rel = torch.where(base > 0, circuit / base, torch.full_like(circuit, float("nan")))
        for k, (out_name, out_site) in enumerate(zip(outs.names, outs.sites)):
            for j, (in_name, in_site) in enumerate(zip(ins.names, ins.sites)):
                site = f"{in_site}{L.ARROW}{out_site}"
                feature = f"{in_name}{L.ARROW}{out_name}"
                rows.append(L.row(step, L.GEOMETRY, param, site, feature, L.CIRCUIT, circuit[k, j]))
                rows.append(L.row(step, L.GEOMETRY, param, site, feature, L.CIRCUIT_REL, rel[k, j]))
    return rows
