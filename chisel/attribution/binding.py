"""Which features each weight reads and writes, as the blocks every family splits over."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import probes
from chisel._warn import warn_at_caller
from chisel.attribution.functional import ParamSpace, UpdatePath
from chisel.attribution.geometry import FeatureBlock
from chisel.attribution.splits import Kernels, read_kernels, write_kernels
from chisel.attribution.stream import Reading, find_readings
from chisel.attribution.transport import Transport, find_transports
from chisel.attribution.weights import LinearWeight, bind_sites, check_bound, linear_weights
from chisel.errors import ChiselError

Blocks = dict[str, tuple[FeatureBlock | None, FeatureBlock | None]]


class AttributionInputError(ChiselError, ValueError):
    """The run, model, features or options given to `chisel.attribute` do not fit together."""


@dataclass(frozen=True)
class Binding:
    """The weights the features bind to and, per weight param, its (input, output) blocks."""

    by_param: dict[str, LinearWeight]
    blocks: Blocks

    def kernels(
        self,
        space: ParamSpace,
        path: UpdatePath,
        gbar: dict[str, Tensor],
        centred: bool,
        reference: Any = None,
    ) -> dict[str, list[Kernels]]:
        """{weight param: [input-side kernels, output-side kernels]} for one step's ḡ.

        Centred: x̄ is each weight's mean input over the metric's states (or `reference`) at
        the middle of the update path (one forward pass), and M = ḡ_b x̄ᵀ.
        """
        readers = [self.by_param[p] for p, (ins, _) in self.blocks.items() if ins is not None]
        readers = [w.module for w in readers if w.bias]
        means = space.mean_inputs(path.at(0.5), readers, reference) if centred and readers else {}
        return self.kernels_at(gbar, means)

    def kernels_at(
        self, gbar: dict[str, Tensor], means: dict[str, Tensor]
    ) -> dict[str, list[Kernels]]:
        """`kernels` for a given gradient (ḡ, or ∇m(θ_t) for the online ledger) and mean inputs
        {module: x̄ [in]} ({} for the plain split); directions are used in the gradient's dtype."""
        out: dict[str, list[Kernels]] = {}
        for param, (ins, outs) in self.blocks.items():
            w = self.by_param[param]
            g = w.matrix(gbar[param])  # [out, in]
            g_bias = gbar[w.bias] if w.bias else None
            sides = []
            if ins is not None:
                xbar = means.get(w.module) if g_bias is not None else None
                mean_grad = torch.outer(g_bias, xbar.to(g.dtype)) if xbar is not None else None
                sides.append(read_kernels(
                    ins.names, ins.sites, ins.directions.to(g.dtype), g, mean_grad,
                    ins.dual().to(g.dtype),
                ))
            if outs is not None:
                sides.append(write_kernels(
                    outs.names, outs.sites, outs.directions.to(g.dtype), g, g_bias,
                    outs.dual().to(g.dtype),
                ))
            out[param] = sides
        return out


def bind(
    model: nn.Module,
    run_forward: Callable[[], Any],
    dtype: torch.dtype,
    recorded: set[str],
    features: probes.FeatureSet,
    centred: bool,
) -> Binding:
    """Bind every feature to the recorded Linear weights that read or write its site (directly,
    through norms and residual additions, or after an elementwise activation), with a few
    forward passes of `run_forward` (the metric) on `model`. The attribution engine and the
    validation's reversion game share it, so they split over the same directions."""
    sites = [f.site for f in features]
    weights = linear_weights(model, recorded)
    weights = bind_sites(model, weights, sites, run_forward, check=False)
    carried = find_transports(model, weights, sites, run_forward)
    readings = find_readings(model, weights, features, run_forward)
    check_bound(weights, sites, {t.site for t in carried} | {r.site for r in readings})
    blocks = feature_blocks(weights, features, dtype, carried, readings)
    binding = Binding({w.param: w for w in weights}, blocks)
    if centred:
        _warn_uncentred(binding)
    return binding


def _warn_uncentred(binding: Binding) -> None:
    plain = [
        p for p, (ins, _) in binding.blocks.items()
        if ins is not None and binding.by_param[p].bias is None
    ]
    if plain:
        warn_at_caller(
            f"chisel: {plain[:5]} have no recorded bias, so their input split cannot be centred "
            "(the mean input's share needs the bias's gradient); they are split uncentred, with "
            "no <mean> row. Pass centred=False to split every weight the same way."
        )


def feature_blocks(
    weights: list[LinearWeight],
    features: probes.FeatureSet,
    dtype: torch.dtype,
    carried: list[Transport] = (),
    readings: list[Reading] = (),
) -> Blocks:
    """{weight param: (input block, output block)}: unit read directions of the features bound at
    each side; an output block may be carried back through an activation (`transport`), and an
    input block holds the stream features that reach the weight through norms and residual
    additions (`stream`), as their images at its input."""
    by_param = {}
    for t in carried:
        by_param.setdefault(t.param, []).append(t)
    reads: dict[str, list[Reading]] = {}
    for r in readings:
        reads.setdefault(r.param, []).append(r)
    exact = {
        w.param: (
            _block(w, [f for s in w.in_sites for f in features.at(s)], w.d_in, "reads", dtype),
            _block(w, [f for s in w.out_sites for f in features.at(s)], w.d_out, "writes", dtype),
        )
        for w in weights
    }
    out = {}
    for w in weights:
        ins, outs = exact[w.param]
        if reads.get(w.param):
            ins = _with_readings(ins, reads[w.param], dtype)
        if by_param.get(w.param):
            outs = _carried_block(w, outs, by_param[w.param], features, dtype)
        if ins is not None or outs is not None:
            out[w.param] = (ins, outs)
    return out


def _block(
    w: LinearWeight, feats: list[probes.Feature], dim: int, verb: str, dtype: torch.dtype
) -> FeatureBlock | None:
    if not feats:
        return None
    for f in feats:
        if f.dim != dim:
            raise probes.FeatureDimensionError(
                f"feature {f.name!r} at {f.site!r} has dimension {f.dim}, but {w.param} {verb} "
                f"{dim}-dimensional activations there."
            )
    norms = [float(f.read.to(torch.float64).norm()) for f in feats]
    tiny = [f.name for f, n in zip(feats, norms) if not (n > 1e-12 and math.isfinite(n))]
    if tiny:
        raise AttributionInputError(
            f"features {tiny[:5]} have a zero, near-zero (< 1e-12) or non-finite read vector: "
            "they name no direction. Drop them or give their read vectors."
        )
    dirs = torch.stack([f.read.to(dtype) / f.read.to(dtype).norm() for f in feats])  # [F, dim]
    return FeatureBlock(tuple(f.name for f in feats), tuple(f.site for f in feats), dirs)


def _with_readings(
    exact: FeatureBlock | None, readings: list[Reading], dtype: torch.dtype
) -> FeatureBlock:
    """The weight's input block: its own input's features, then the stream features' images."""
    names = [*(exact.names if exact else ()), *(n for r in readings for n in r.names)]
    sites = [*(exact.sites if exact else ()), *(r.site for r in readings for _ in r.names)]
    dirs = [*([exact.directions] if exact else []), *(r.directions.to(dtype) for r in readings)]
    return FeatureBlock(tuple(names), tuple(sites), torch.cat(dirs))


def _carried_block(
    w: LinearWeight,
    exact: FeatureBlock | None,
    transports: list[Transport],
    features: probes.FeatureSet,
    dtype: torch.dtype,
) -> FeatureBlock | None:
    """Features at sites h = φ(z) of the weight's output, carried back to z (one site)."""
    if exact is not None:
        warn_at_caller(
            f"chisel: {w.param} has features at its own output ({exact.sites[0]!r}) and after an "
            f"activation ({transports[0].site!r}); its write split uses the former only."
        )
        return exact
    if len(transports) > 1:
        warn_at_caller(
            f"chisel: {w.param} feeds several activation sites with features "
            f"({[t.site for t in transports]}); its write split uses {transports[0].site!r}."
        )
    t = transports[0]
    block = _block(w, list(features.at(t.site)), w.d_out, "writes", dtype)
    back, duals = t.carry(block.directions, block.dual())
    return FeatureBlock(block.names, block.sites, back, duals)
