"""Features that reach a weight's input through parameter-free maps: the residual stream.

No Linear reads `blocks.0.hook_resid_pre` directly: every reader sits behind a LayerNorm /
RMSNorm, and the stream flows on through residual additions to every later layer. A feature d at
such a site reaches a reader W as the image of d under the maps in between. chisel measures that
image with forward-mode AD: one forward pass of the metric with the site's activation carrying
the tangent d (every row), every Linear-like module stopping the tangent at its output (so only
paths through residual additions, norms and activations count: what the stream *carries*, not
what other weights compute from it), and each reader's input tangent averaged over its rows:

    d_W = mean_rows ∂x_W/∂s · d        (LayerNorm: ≈ γ ⊙ (d − mean d) / σ, a residual add: d)

The reader's input split then uses d_W as the feature's direction. Exact: the sums (the split of
ΔW over any directions closes). Not exact: reading the row as "the stream feature d" holds to first
order, with the norm's per-row scale averaged, at the model's own parameters (pass the trained
model), and ignores how the norm's own parameters change during a step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

import probes
from chisel.attribution.weights import FeatureSiteError, LinearWeight
from probes.sites import Site, hook_site, module_at

_REACHED = 1e-9  # a reader whose input tangent is below this (relative to ‖d‖) is not reached


@dataclass(frozen=True)
class Reading:
    """Features at `site` reach weight `param`'s input as `directions` [F, in] (unit rows)."""

    param: str
    site: str
    names: tuple[str, ...]
    directions: Tensor  # [F, in]


def find_readings(
    model: nn.Module,
    weights: list[LinearWeight],
    features: probes.FeatureSet,
    run_forward: Callable[[], Any],
    seed: int = 0,
) -> list[Reading]:
    """Every (site, weight) where the site's features reach the weight's input through
    parameter-free maps only, and the site is not the weight's input itself."""
    exact = {(s, w.param) for w in weights for s in w.in_sites}
    out = []
    for site_name in dict.fromkeys(f.site for f in features):
        site = probes.resolve_site(model, site_name)
        feats = list(features.at(site_name))
        gen = torch.Generator().manual_seed(seed)
        probe = torch.randn(feats[0].dim, generator=gen, dtype=torch.float64)
        reached = _tangents(model, site, weights, probe, run_forward)
        readers = [w for w in weights if w.param in reached and (site_name, w.param) not in exact]
        if not readers:
            continue
        images = [_tangents(model, site, readers, f.read.double(), run_forward) for f in feats]
        for w in readers:
            kept = [
                (f.name, img[w.param])
                for f, img in zip(feats, images)
                if w.param in img and img[w.param].norm() > _REACHED * f.read.double().norm()
            ]
            if kept:
                dirs = torch.stack([v / v.norm() for _, v in kept])
                out.append(Reading(w.param, site_name, tuple(n for n, _ in kept), dirs))
    return out


def _tangents(
    model: nn.Module,
    site: Site,
    weights: list[LinearWeight],
    direction: Tensor,
    run_forward: Callable[[], Any],
) -> dict[str, Tensor]:
    """{weight param: its input's tangent averaged over rows} for a tangent `direction` at `site`."""
    seen: dict[str, Tensor] = {}
    handles: list[Any] = []
    stream = _SameTensor()

    def seed_dual(value: Any) -> Tensor:
        if not isinstance(value, Tensor):
            raise FeatureSiteError(
                f"the activation at {site.name!r} is a {type(value).__name__}, not a tensor (a "
                "Hugging Face attention module returns (output, weights)), so features there name "
                "no direction of it. Put them at a site that carries one tensor: the submodule "
                f"that produces the output you mean ({_inner_sites(model, site)}), or the ':in' "
                "of the module that reads it."
            )
        if value.shape[-1] != direction.shape[0]:
            raise probes.FeatureDimensionError(
                f"features at {site.name!r} have dimension {direction.shape[0]}, but the model "
                f"reads {value.shape[-1]}-dimensional activations there."
            )
        if stream.swap(value) is not value:  # the same tensor seen again (a module run twice)
            return stream.swap(value)
        tangent = direction.to(value.dtype).expand_as(value).contiguous()
        return stream.seed(value, fwAD.make_dual(value, tangent))

    def reader(w: LinearWeight):
        def pre(mod: nn.Module, args: tuple) -> None:
            tangent = fwAD.unpack_dual(stream.swap(args[0])).tangent
            if tangent is not None:
                rows = tangent.reshape(-1, tangent.shape[-1]).double()
                seen[w.param] = seen.get(w.param, 0) + rows.mean(0)

        return pre

    def stop(mod: nn.Module, args: tuple, output: Any) -> Any:
        return fwAD.unpack_dual(output).primal if isinstance(output, Tensor) else output

    try:
        handles.append(hook_site(model, site, seed_dual))
        by_module = {w.module: w for w in weights}
        for name, module in model.named_modules():
            linear = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or (
                type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            )
            if name in by_module:
                handles.append(module.register_forward_pre_hook(reader(by_module[name])))
            if linear:
                handles.append(module.register_forward_hook(stop))
        with fwAD.dual_level(), torch.no_grad(), stream:
            run_forward()
    finally:
        for h in handles:
            h.remove()
    return seen


def _inner_sites(model: nn.Module, site: Site) -> str:
    """The ':out' sites of a module site's last children, as suggestions."""
    if site.kind == "hook":
        return "e.g. a submodule's ':out'"
    children = [name for name, _ in module_at(model, site.target).named_children()]
    prefix = f"{site.target}." if site.target else ""
    if not children:
        return "it has no submodules"
    return "e.g. " + ", ".join(repr(f"{prefix}{c}:out") for c in children[-3:])


class _SameTensor(TorchFunctionMode):
    """After the site fires, every op that takes the site's tensor gets its dual instead.

    A hook replaces the activation for the module it feeds only: TransformerLens's
    `hook_resid_mid` is `ln2.hook_in`, and Hugging Face's `ln_2:in` is `ln_2`'s argument, while
    the block's residual addition reads the same tensor from a local variable. The stream at the
    site is that tensor, wherever it flows, so the tangent must ride on all of its uses.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pairs: list[tuple[Tensor, Tensor]] = []  # (primal, dual) per firing of the site

    def seed(self, primal: Tensor, dual: Tensor) -> Tensor:
        self._pairs.append((primal, dual))  # holding the primal keeps its identity unique
        return dual

    def swap(self, a: Any) -> Any:
        for primal, dual in self._pairs:
            if a is primal:
                return dual
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self._pairs:
            args, kwargs = tree_map(self.swap, (args, kwargs or {}))
        return func(*args, **(kwargs or {}))
