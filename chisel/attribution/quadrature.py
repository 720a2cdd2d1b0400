"""Gauss-Legendre quadrature along the update path θ(α) = θ_t + α·Δθ_t, α ∈ [0, 1].

Smooth networks: one panel of `points` Gauss-Legendre nodes (error ~1e-15 at 16 points in
float64). Piecewise-linear activations (ReLU…) put kinks into ∇m(θ(α)), where fixed quadrature
stalls near 1e-5 and more points do not help; there the path is split at every α where a unit's
pre-activation crosses a breakpoint (bracketing root search, all roots refined together), and
each smooth piece gets its own small panel. The pre-activation is read before the module runs,
so in-place activations (`inplace=True`) are split exactly too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from chisel.attribution.functional import Params, UpdatePath

# module type -> the pre-activation values where its slope jumps
_BREAKPOINTS = {
    nn.ReLU: lambda m: (0.0,),
    nn.LeakyReLU: lambda m: (0.0,),
    nn.PReLU: lambda m: (0.0,),
    nn.ReLU6: lambda m: (0.0, 6.0),
    nn.Hardtanh: lambda m: (m.min_val, m.max_val),
}


@lru_cache(maxsize=64)
def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes in (0, 1) and weights summing to 1, for n points."""
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1.0) / 2.0, w / 2.0


def piecewise_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) in _BREAKPOINTS]


@dataclass
class PathIntegral:
    """The path-averaged gradient ḡ = ∫₀¹ ∇m(θ(α)) dα and the metric at both ends."""

    gbar: Params
    m_start: float
    m_end: float
    pieces: int
    evaluations: int


def _offsets_fn(path: UpdatePath, modules: list[nn.Module]):
    """θ ↦ [units]: every piecewise unit's pre-activation minus each of its breakpoints.

    Read in a forward *pre*-hook and copied there: an in-place activation (nn.ReLU(inplace=True))
    rectifies its input, so a forward hook would see no crossing and the split would miss kinks.
    """

    def fn(params: Params) -> Tensor:
        seen: list[Tensor] = []

        def hook(module: nn.Module, inputs: tuple) -> None:
            z = inputs[0].reshape(-1)  # [batch·units], before the module can overwrite it
            seen.extend(z - bp for bp in _BREAKPOINTS[type(module)](module))  # new tensors: copies

        handles = [m.register_forward_pre_hook(hook) for m in modules]
        try:
            path.space.call(params)
        finally:
            for h in handles:
                h.remove()
        return torch.cat(seen)

    return fn


def kink_roots(
    path: UpdatePath, *, grid: int = 32, tol: float = 1e-13, rounds: int = 60, predict: bool = True
) -> list[float]:
    """Every α where some unit crosses a breakpoint (one root per grid cell and unit).

    Each root is first predicted from the grid alone: the cubic through the 4 grid values around
    its cell (exact for a pre-activation that is a polynomial of degree <= 3 in α there, as an
    MLP's first three ReLU layers are between the kinks upstream), then checked with 2
    evaluations at the prediction ∓ tol/2: a sign change there brackets the root to tol. Roots
    whose check fails (a kink upstream within the stencil, a non-polynomial layer) keep the
    narrower bracket and are refined by the bracketing search as before, so every root is
    bracketed to `tol` either way. predict=False: the bracketing search alone (the earlier
    scheme, for comparison).
    """
    modules = piecewise_modules(path.space.model)
    if not modules:
        return []
    fn = _offsets_fn(path, modules)
    alphas = torch.linspace(0.0, 1.0, grid + 1, dtype=torch.float64)
    values = path.outputs(alphas, fn)  # [grid+1, units]
    cells, units = torch.nonzero(torch.sign(values[:-1]) * torch.sign(values[1:]) < 0, as_tuple=True)
    if len(units) == 0:
        return []
    a, b = alphas[cells].clone(), alphas[cells + 1].clone()
    fa, fb = values[cells, units].clone(), values[cells + 1, units].clone()

    def model_at(c: Tensor, idx: Tensor) -> Tensor:
        return path.outputs(c, fn)[torch.arange(len(idx)), units[idx]]

    if predict:
        a, b, fa, fb = _predict_and_check(alphas, values, cells, units, a, b, fa, fb, model_at, tol)
    a, b = _illinois(a, b, fa, fb, model_at, tol, rounds)
    return sorted((0.5 * (a + b)).tolist())


def _predict_and_check(
    alphas: Tensor, values: Tensor, cells: Tensor, units: Tensor,
    a: Tensor, b: Tensor, fa: Tensor, fb: Tensor, model_at, tol: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Brackets (a, b, f(a), f(b)) narrowed by a grid-only prediction and a 2-point check."""
    grid = len(alphas) - 1
    if grid < 3:
        return a, b, fa, fb
    first = (cells - 1).clamp(0, grid - 3)
    at = first[:, None] + torch.arange(4)  # [roots, 4] the stencil's grid indices
    xs, ys = alphas[at], values[at, units[:, None]]

    def cubic(c: Tensor, idx: Tensor) -> Tensor:  # Lagrange form through the stencil
        x, y, out = xs[idx], ys[idx], torch.zeros_like(c)
        for k in range(4):
            term = y[:, k]
            for j in range(4):
                if j != k:
                    term = term * (c - x[:, j]) / (x[:, k] - x[:, j])
            out = out + term
        return out

    pa, pb = _illinois(a.clone(), b.clone(), fa.clone(), fb.clone(), cubic, tol / 100, 100)
    guess = 0.5 * (pa + pb)
    lo = torch.maximum(guess - tol / 2, a)
    hi = torch.minimum(guess + tol / 2, b)
    everyone = torch.arange(len(a))
    f_lo, f_hi = model_at(lo, everyone), model_at(hi, everyone)
    s_a, s_lo, s_hi = torch.sign(fa), torch.sign(f_lo), torch.sign(f_hi)
    closed = (s_lo != s_hi) | (s_lo == 0) | (s_hi == 0)  # the root lies in [lo, hi]
    right = ~closed & (s_lo == s_a)  # lo and hi both on a's side: the root is right of hi
    left = ~closed & ~right
    a, fa = torch.where(closed, lo, torch.where(right, hi, a)), torch.where(right, f_hi, fa)
    b, fb = torch.where(closed, hi, torch.where(left, lo, b)), torch.where(left, f_lo, fb)
    return a, b, fa, fb


def _illinois(a: Tensor, b: Tensor, fa: Tensor, fb: Tensor, f, tol: float, rounds: int) -> tuple[Tensor, Tensor]:
    """Illinois (modified regula falsi) for all brackets at once; f(c, idx) evaluates the open
    brackets idx at c. Returns the brackets, each narrowed to `tol` (or `rounds` spent)."""
    side = torch.zeros_like(a)
    for _ in range(rounds):
        open_ = (b - a) > tol
        if not open_.any():
            break
        c = (a * fb - b * fa) / (fb - fa)
        c = torch.where((c > a) & (c < b), c, 0.5 * (a + b))
        idx = torch.nonzero(open_).squeeze(1)
        fc = torch.zeros_like(c)
        fc[idx] = f(c[idx], idx)
        right = (torch.sign(fc) == torch.sign(fb)) & open_
        left = ~right & open_
        # Illinois: halve the stale end's value when the same side moves twice in a row
        fa = torch.where(right & (side == -1), fa / 2, fa)
        fb = torch.where(left & (side == 1), fb / 2, fb)
        b, fb = torch.where(right, c, b), torch.where(right, fc, fb)
        a, fa = torch.where(left, c, a), torch.where(left, fc, fa)
        side = torch.where(right, -1.0, torch.where(left, 1.0, side))
        exact = (fc == 0) & open_
        a, b = torch.where(exact, c, a), torch.where(exact, c, b)
    return a, b


def integrate_path(path: UpdatePath, *, points: int = 16, split: str = "auto") -> PathIntegral:
    """ḡ by Gauss-Legendre over [0, 1], split at activation kinks when `split` asks for it.

    split: "auto" (split if the model has piecewise-linear activation modules), "kinks", "none".
    """
    space = path.space
    before = space.evaluations
    m_start, m_end = space.value(path.theta), space.value(path.at(1.0))
    edges = [0.0, 1.0]
    if split == "kinks" or (split == "auto" and piecewise_modules(space.model)):
        edges = _merge([0.0, *kink_roots(path), 1.0])
    alphas, weights = [], []
    for a, b in itertools.pairwise(edges):
        width = b - a
        # one smooth path gets the full rule; the short pieces between kinks need few nodes
        n = points if len(edges) == 2 else int(min(points, max(3, np.ceil(points * width * 8))))
        nodes, w = gauss_legendre(n)
        alphas.append(a + width * nodes)
        weights.append(width * w)
    gbar = path.weighted_grad(
        torch.from_numpy(np.concatenate(alphas)), torch.from_numpy(np.concatenate(weights))
    )
    return PathIntegral(gbar, m_start, m_end, len(edges) - 1, space.evaluations - before)


def _merge(edges: list[float], eps: float = 1e-12) -> list[float]:
    out = [edges[0]]
    for e in sorted(edges[1:]):
        if e - out[-1] > eps:
            out.append(e)
    out[-1] = 1.0
    return out
