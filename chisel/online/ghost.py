"""Per-sample credit by ghost dot-products: ⟨κ ⊙ g_i x_iᵀ, ∇m⟩ = g_iᵀ (κ ⊙ ∇m) x_i for every
sample of a Linear layer at once, without forming a per-sample gradient (In-Run Data Shapley's
"ghost" inner products, with Adam's κ held fixed at the step).

Rows per step, all first-order (⟨part, ∇m(θ_t)⟩):
    part "gradient", sample i     the sample's term of this step's gradient part
    part "gradient (unresolved)"  the gradient part no captured sample accounts for
    part "weight_decay", "momentum (unresolved)", "residual"   whole, per param
Online there are no earlier steps' samples to hand the momentum part to (that is what the disk
would have held): it stays whole, as "momentum (unresolved)".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from chisel.attribution import ledger as L
from chisel.attribution.credit import GRADIENT_UNRESOLVED, MOMENTUM_UNRESOLVED
from chisel.attribution.optim_models import GRADIENT, MOMENTUM, RESIDUAL, WEIGHT_DECAY
from chisel.attribution.splits import Kernels
from chisel.online.parts import ParamStep
from chisel.online.writer import FIRST_ORDER, ORDER, Coded

# whole-part leaves in the offline credit's names
_WHOLE = {WEIGHT_DECAY: WEIGHT_DECAY, MOMENTUM: MOMENTUM_UNRESOLVED, RESIDUAL: RESIDUAL}


@dataclass(frozen=True)
class LinearFactors:
    """A Linear module's params: weight [out, in] and optional bias [out]."""

    module: str
    weight: str
    bias: str | None


def sample_values(x: Tensor, g: Tensor, h: Tensor) -> Tensor:
    """[n]: Σ_T g_{iT}ᵀ H x_{iT}, x [n, …, in], g [n, …, out], H [out, in]."""
    n = x.shape[0]
    xs, gs = x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])  # [n, T, in/out]
    return ((gs @ h) * xs).sum((1, 2))


def bias_values(g: Tensor, h: Tensor) -> Tensor:
    """[n]: Σ_T g_{iT} · h, g [n, …, out], h [out]."""
    n = g.shape[0]
    return (g.reshape(n, -1, g.shape[-1]) @ h).sum(1)


def _columns(t: int, part: str, param: str, site: str, feature, value: np.ndarray,
             sample: np.ndarray | None = None, quantity=L.ATTRIBUTION) -> dict[str, np.ndarray]:
    # a scalar stands for the whole chunk (the writer repeats it without a Python loop)
    return {
        L.STEP: t, L.FAMILY: L.CREDIT, L.PART: part, L.PARAM: param, L.SITE: site,
        L.FEATURE: feature, L.QUANTITY: quantity, L.VALUE: np.asarray(value, dtype=np.float64),
        L.SAMPLE: None if sample is None else sample.astype(np.float64), ORDER: FIRST_ORDER,
    }


def credit_columns(
    t: int,
    steps: dict[str, ParamStep],
    grad_m: dict[str, Tensor],
    factors: dict[str, list[tuple[Tensor, Tensor]]],
    layers: dict[str, LinearFactors],
    coef: float,
    kernels: dict[str, list[Kernels]],
    sites: dict[str, str],
    sample_features: bool,
) -> list[dict[str, np.ndarray]]:
    """Column chunks of step t's credit rows (see the module docstring)."""
    out: list[dict[str, np.ndarray]] = []
    resolved: dict[str, float] = {}
    samples: list[tuple[str, str, Tensor]] = []  # (param, site, [n] values)
    for module, pairs in factors.items():
        layer = layers[module]
        sides = kernels.get(layer.weight, [])
        site = sites.get(layer.weight, "")
        for param, is_bias in ((layer.weight, False), (layer.bias, True)):
            if param is None or param not in steps:
                continue
            kappa = steps[param].kappa
            h = (kappa * grad_m[param]) * coef  # [out, in] or [out]
            values = [bias_values(g.to(h.dtype), h) if is_bias
                      else sample_values(x.to(h.dtype), g.to(h.dtype), h) for x, g in pairs]
            value = torch.cat(values)
            resolved[param] = resolved.get(param, 0.0) + float(value.sum())
            samples.append((param, site, value))
            if sample_features and not is_bias:
                idx = np.arange(len(value))
                out += _sample_feature_columns(t, param, pairs, sides, kappa, coef, idx)
    if samples:
        out.append(_sample_columns(t, samples))
    names, parts, values = [], [], []
    for param, step in steps.items():
        g = grad_m[param]
        whole = float((step.parts[GRADIENT] * g).sum())
        leaves = [(GRADIENT_UNRESOLVED, whole - resolved.get(param, 0.0))]
        leaves += [(_WHOLE[k], float((step.parts[k] * g).sum())) for k in _WHOLE]
        for part, value in leaves:
            names.append(param)
            parts.append(part)
            values.append(value)
    if values:  # one chunk for every param's whole parts
        cols = _columns(t, "", "", "", L.WHOLE, np.array(values))
        labels = tuple(dict.fromkeys(parts))
        cols[L.PART] = Coded(labels, np.array([labels.index(p) for p in parts]))
        cols[L.PARAM] = Coded(tuple(names), np.arange(len(names)))
        out.append(cols)
    return out


def _sample_columns(t: int, samples: list[tuple[str, str, Tensor]]) -> dict[str, Any]:
    """All whole-sample rows of a step as one chunk (params and sites as coded columns)."""
    counts = np.array([len(v) for _, _, v in samples])
    which = np.repeat(np.arange(len(samples)), counts)
    params = tuple(p for p, _, _ in samples)
    sites = tuple(dict.fromkeys(s for _, s, _ in samples))
    site_index = np.array([sites.index(s) for _, s, _ in samples])[which]
    value = torch.cat([v.double() for _, _, v in samples]).numpy()
    cols = _columns(t, GRADIENT, "", "", L.WHOLE, value,
                    np.concatenate([np.arange(c) for c in counts]))
    cols[L.PARAM], cols[L.SITE] = Coded(params, which), Coded(sites, site_index)
    return cols


def _sample_feature_columns(t, param, pairs, sides, kappa, coef, idx):
    """Per sample and feature: ⟨κ ⊙ c·g_i x_iᵀ, R_k⟩ by the offline kernels (`Kernels.sample_shares`)."""
    out = []
    for k in sides:
        g = torch.cat([gg.reshape(gg.shape[0], -1, gg.shape[-1]) for _, gg in pairs]).to(k.weight.dtype)
        x = torch.cat([xx.reshape(xx.shape[0], -1, xx.shape[-1]) for xx, _ in pairs]).to(k.weight.dtype)
        values = k.sample_shares(g, x, kappa * coef)  # [n, K]
        n, kk = values.shape
        out.append(_columns(
            t, GRADIENT, param, np.tile(np.array(k.sites, dtype=object), n),
            np.tile(np.array(k.labels, dtype=object), n), values.reshape(-1).numpy(),
            np.repeat(idx, kk), k.quantity,
        ))
    return out
