"""The kink search: grid-predicted roots checked with 2 evaluations find the same kinks, to the
same tolerance, as the plain bracketing search from the grid, with fewer evaluations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chisel.attribution import quadrature as Q
from chisel.attribution.functional import ParamSpace, UpdatePath

TOL = 1e-13


def _path(hidden_act: type[nn.Module], states: int = 32, scale: float = 0.02) -> UpdatePath:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), hidden_act(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    x = torch.randn(states, 4, dtype=torch.float64)
    space = ParamSpace(model, lambda m: torch.log_softmax(m(x), -1)[:, 0].mean(), torch.float64, "cpu")
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    delta = {n: scale * torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in theta.items()}
    return UpdatePath(space, theta, delta)


def _plain_roots(path: UpdatePath, grid: int = 32) -> list[float]:
    """The earlier scheme: every grid sign change refined by Illinois alone."""
    fn = Q._offsets_fn(path, Q.piecewise_modules(path.space.model))
    alphas = torch.linspace(0.0, 1.0, grid + 1, dtype=torch.float64)
    values = path.outputs(alphas, fn)
    cells, units = torch.nonzero(torch.sign(values[:-1]) * torch.sign(values[1:]) < 0, as_tuple=True)
    a, b = Q._illinois(alphas[cells].clone(), alphas[cells + 1].clone(),
                       values[cells, units].clone(), values[cells + 1, units].clone(),
                       lambda c, idx: path.outputs(c, fn)[torch.arange(len(idx)), units[idx]], TOL, 60)
    assert bool(((b - a) <= TOL).all())
    return sorted((0.5 * (a + b)).tolist())


@pytest.mark.parametrize("first", [nn.ReLU, nn.Tanh])  # Tanh: layer 2's input is not polynomial in α
def test_predicted_roots_are_the_bracketed_roots_with_fewer_evaluations(first):
    path = _path(first)
    space = path.space
    before = space.evaluations
    plain = _plain_roots(path)
    plain_evals, before = space.evaluations - before, space.evaluations
    roots = Q.kink_roots(path, tol=TOL)
    evals = space.evaluations - before
    assert len(plain) > 20 and len(roots) == len(plain)
    assert max(abs(x - y) for x, y in zip(roots, plain, strict=True)) <= TOL
    assert evals < plain_evals
    # every root is a sign change of some unit within TOL
    fn = Q._offsets_fn(path, Q.piecewise_modules(space.model))
    r = torch.tensor(roots, dtype=torch.float64)
    lo, hi = path.outputs(r - TOL, fn), path.outputs(r + TOL, fn)
    assert bool(((torch.sign(lo) != torch.sign(hi)).any(1)).all())


def test_the_integral_closes_and_matches_the_plain_search():
    path = _path(nn.ReLU)
    result = Q.integrate_path(path, points=8)
    delta_m = result.m_end - result.m_start
    total = sum(float((path.delta[n] * result.gbar[n]).sum()) for n in path.delta)
    assert abs(total - delta_m) <= 1e-12 * abs(delta_m)
    assert result.pieces == len(_plain_roots(path)) + 1
