"""Output-side features after an elementwise activation: the site h = φ(z) of a weight's z = Wx + b.

A probe at "hook_pi_hidden1" (after tanh) names a direction of h, not of the weight's output z,
so the write split of W needs the feature carried back through φ. Linearised at a state s,
Δh_s = φ'(z_s) ⊙ Δz_s. With φ̄' the slope averaged over the metric's states, the pair

    ũ_k = u_k ⊘ φ̄'     (the change of z that moves h along u_k)
    f̃_k = φ̄' ⊙ f_k     (f_k: the least-squares dual of the features at h; f̃_kᵀ Δz = f_kᵀ (φ̄' ⊙ Δz))

is biorthogonal (f̃_jᵀ ũ_k = f_jᵀ u_k = δ_jk), so Σ_k ũ_k f̃_kᵀ is an (oblique) projector and the
write split ⟨ũ_k f̃_kᵀ ΔW, ḡ⟩ + residual closes exactly, as every split does. What is exact and
what is not: the sums are exact; reading feature k's row as "the change of h along u_k" is exact
when φ' is the same at every metric state (a linear region) and a first-order average otherwise.
Units whose mean slope is 0 (dead ReLUs) cannot move h: ũ is 0 there. The slope is measured
once, at the model's own parameters (pass the trained model to read the trained network).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import probes
from chisel.attribution.weights import LinearWeight
from probes.sites import Site, hook_site, module_at

_SLOPE_FLOOR = 1e-12  # relative to the largest mean slope: below it a unit counts as dead


@dataclass(frozen=True)
class Transport:
    """Feature site `site` is φ(z) of weight `param`'s output, with mean slope φ̄' [out]."""

    param: str
    site: str
    slope: Tensor  # [out]

    def carry(self, directions: Tensor, duals: Tensor) -> tuple[Tensor, Tensor]:
        """(ũ [K, out], f̃ [out, K]) from unit directions [K, out] at h and their duals [out, K]."""
        slope = self.slope.to(directions.dtype)
        alive = slope.abs() > _SLOPE_FLOOR * float(slope.abs().max().clamp_min(1e-300))
        safe = torch.where(alive, slope, torch.ones_like(slope))
        back = torch.where(alive, directions / safe, torch.zeros_like(directions))
        return back, duals * slope[:, None]


def find_transports(
    model: nn.Module, weights: list[LinearWeight], sites: list[str], run_forward, seed: int = 0
) -> list[Transport]:
    """Every (weight, site) where the site is an elementwise function of the weight's output.

    For each feature site not already a weight's own output, the candidate is the latest weight
    run before it whose output has the site's shape; two vector-Jacobian products with different
    random vectors tell whether ∂h/∂z is diagonal (then their ratios agree: φ'(z)).
    """
    exact = {s for w in weights for s in w.out_sites}
    wanted = [probes.resolve_site(model, s) for s in dict.fromkeys(sites) if s not in exact]
    if not wanted:
        return []
    events, handles = [], []  # (kind, name, tensor) in execution order

    def on_weight(w: LinearWeight):
        def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            z = output.detach().requires_grad_(True)
            events.append(("weight", w, z))
            return z.clone()  # not the leaf itself: an in-place activation may follow

        return hook

    def on_site(site: Site):
        def note(value: Any) -> None:
            if isinstance(value, Tensor):
                events.append(("site", site.name, value))

        return note

    try:
        for w in weights:
            handles.append(module_at(model, w.module).register_forward_hook(on_weight(w)))
        for site in wanted:
            handles.append(hook_site(model, site, on_site(site)))
        with torch.enable_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    return _match(events, seed)


def _match(events: list[tuple], seed: int) -> list[Transport]:
    found: dict[str, Transport] = {}
    gen = torch.Generator().manual_seed(seed)
    for i, (kind, name, h) in enumerate(events):
        if kind != "site" or name in found or not h.requires_grad:
            continue
        earlier = [(w, z) for k, w, z in events[:i] if k == "weight" and z.shape == h.shape]
        if not earlier:
            continue
        w, z = earlier[-1]
        slope = _elementwise_slope(h, z, gen)
        if slope is not None:
            found[name] = Transport(w.param, name, slope.reshape(-1, slope.shape[-1]).mean(0))
    return list(found.values())


def _elementwise_slope(h: Tensor, z: Tensor, gen: torch.Generator) -> Tensor | None:
    """φ'(z) [*, out] if h depends on z elementwise, else None."""
    ratios = []
    for _ in range(2):
        u = (1.0 + torch.rand(h.shape, generator=gen)).to(h.dtype)
        (grad,) = torch.autograd.grad(h, z, u, retain_graph=True, allow_unused=True)
        if grad is None:
            return None
        ratios.append(grad / u)
    if not torch.allclose(ratios[0], ratios[1], rtol=1e-6, atol=1e-12):
        return None
    return ratios[0].detach()
