"""One convention for splitting a weight's share of Δm over features, for every family.

Any additive part U of a Linear weight's update (the whole ΔW, one sample's term, the momentum
carry) gets the attribution ⟨U, ḡ⟩. The split over features is a split of ḡ into *kernels*
R_k with Σ_k R_k = ḡ, so every part gets ⟨U, R_k⟩ and the parts of every family add up per
feature, whatever the optimizer (integrated and credit agree row for row).

Input side (how the layer reads its input features), with D [F, in] the unit read directions,
E = Dᵀ(DDᵀ)⁺ [in, F] their dual (least-squares coefficients c = Eᵀx), P = Σ_j d_j e_jᵀ the
projector on their span, and — centred — M = ḡ_b x̄ᵀ, the path-averaged gradient of the bias
times the mean input x̄ of the metric's states:

    feature j:   R_j = (ḡ − M) e_j d_jᵀ      ⟨U, R_j⟩ = ⟨U d_j e_jᵀ, ḡ − M⟩
    <mean>:      R = M                        the change acting on the mean input, like a bias
    <residual>:  R = (ḡ − M)(I − P)           off the features' span

so pathway j's part of an update is U d_j e_jᵀ: the update's action on direction d_j, weighted
by each state's coefficient on feature j around its mean. Uncentred (or a layer without bias):
M = 0 and there is no <mean> row.

Output side (how the computation producing a feature changed), U_f [K, out] unit directions at
the weight's output, F = U_fᵀ(U_f U_fᵀ)⁺ [out, K], Q = Σ_k u_k f_kᵀ:

    feature k:   R_k = f_k u_kᵀ ḡ             ⟨U, R_k⟩ = ⟨u_k f_kᵀ U, ḡ⟩ (Δy in feature coordinates)
    <residual>:  R = (I − Q) ḡ
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from chisel.attribution import ledger as L

# bound the [rows, K, in] intermediate of a sample block's shares (elements)
_CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True)
class Kernels:
    """K kernels of one weight (and its bias), whose inner products split ⟨part, ḡ⟩ exactly.

    quantity: the ledger quantity of the rows (input side: "attribution"; output side:
    "attribution_write"); labels: feature names, then "<mean>" (centred input side) and
    "<residual>"; weight: [K, out, in]; bias: [K, out] for the bias param (None: the bias is
    not split on this side and keeps its whole "<bias>" row).
    """

    quantity: str
    labels: tuple[str, ...]
    sites: tuple[str, ...]
    weight: Tensor  # [K, out, in]
    bias: Tensor | None = None  # [K, out]

    def shares(self, update: Tensor) -> Tensor:
        """[K]: ⟨update, R_k⟩ for an [out, in] part of the weight's update."""
        return self.weight.flatten(1) @ update.reshape(-1)

    def bias_shares(self, update: Tensor) -> Tensor:
        """[K]: ⟨update, r_k⟩ for an [out] part of the bias's update."""
        return self.bias @ update

    def sample_shares(self, g: Tensor, x: Tensor, coef: Tensor | float) -> Tensor:
        """[n, K]: ⟨coef ⊙ Σ_T g_T x_Tᵀ, R_k⟩ for every sample, without per-sample matrices.

        g: [n, T, out]; x: [n, T, in]; coef: a number or [out, in] (Adam's preconditioner).
        """
        n, steps, d_out = g.shape
        k, _, d_in = self.weight.shape
        kernels = self.weight * coef  # [K, out, in]
        flat = kernels.permute(1, 0, 2).reshape(d_out, k * d_in)  # [out, K·in]
        rows_g, rows_x = g.reshape(n * steps, d_out), x.reshape(n * steps, d_in)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, k * d_in))
        parts = []
        for start in range(0, n * steps, chunk):
            reads = (rows_g[start : start + chunk] @ flat).reshape(-1, k, d_in)  # [rows, K, in]
            parts.append((reads * rows_x[start : start + chunk, None, :]).sum(-1))  # [rows, K]
        return torch.cat(parts).reshape(n, steps, k).sum(1)

    def sample_bias_shares(self, g: Tensor, coef: Tensor | float) -> Tensor:
        """[n, K]: ⟨coef ⊙ Σ_T g_T, r_k⟩ for every sample (g: [n, T, out])."""
        return g.sum(1) @ (self.bias * coef).T


def dual(directions: Tensor) -> Tensor:
    """Dᵀ(DDᵀ)⁺ [d, F] for unit rows D [F, d]: c = dualᵀ x are least-squares coefficients."""
    return directions.T @ torch.linalg.pinv(directions @ directions.T)


def read_kernels(
    names: tuple[str, ...],
    sites: tuple[str, ...],
    directions: Tensor,
    gbar: Tensor,
    mean_grad: Tensor | None = None,
    duals: Tensor | None = None,
) -> Kernels:
    """Input-side kernels of a weight with path-averaged gradient `gbar` [out, in].

    directions: [F, in] unit read directions at the weight's input; mean_grad: M = ḡ_b x̄ᵀ
    [out, in] for the centred split (None: uncentred, no "<mean>" kernel); duals: their
    least-squares dual [in, F] if already computed (it depends on the directions only).
    """
    d = directions.to(gbar.dtype)
    e = dual(d) if duals is None else duals.to(gbar.dtype)  # [in, F]
    centred = gbar if mean_grad is None else gbar - mean_grad  # [out, in]
    features = torch.einsum("of,fi->foi", centred @ e, d)  # [F, out, in]
    residual = centred - centred @ (e @ d)  # (ḡ − M)(I − P)
    extra = [residual] if mean_grad is None else [mean_grad, residual]
    labels = (*names, *([] if mean_grad is None else [L.MEAN]), L.RESIDUAL)
    sites = (*sites, *[sites[0]] * len(extra))
    return Kernels(L.ATTRIBUTION, labels, sites, torch.cat([features, torch.stack(extra)]))


def write_kernels(
    names: tuple[str, ...],
    sites: tuple[str, ...],
    directions: Tensor,
    gbar: Tensor,
    gbar_bias: Tensor | None = None,
    duals: Tensor | None = None,
) -> Kernels:
    """Output-side kernels: directions [K, out] at the weight's output, `gbar` [out, in].

    duals: [out, K] biorthogonal to the directions (features carried through an activation,
    see `transport`); default the least-squares dual, so that Σ_k u_k f_kᵀ = Q.
    """
    u = directions.to(gbar.dtype)
    f = dual(u) if duals is None else duals.to(gbar.dtype)  # [out, K]
    q = f @ u  # Σ_k f_k u_kᵀ: Q (symmetric) or the transpose of an oblique projector
    features = torch.einsum("ok,ki->koi", f, u @ gbar)  # [K, out, in]
    weight = torch.cat([features, (gbar - q @ gbar)[None]])
    bias = None
    if gbar_bias is not None:
        bias = torch.cat([f.T * (u @ gbar_bias)[:, None], (gbar_bias - q @ gbar_bias)[None]])
    labels, all_sites = (*names, L.RESIDUAL), (*sites, sites[0])
    return Kernels(L.WRITE_ATTRIBUTION, labels, all_sites, weight, bias)
