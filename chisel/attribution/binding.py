"""Which features each weight reads and writes, as the blocks every family splits over."""

from __future__ import annotations

import math
import warnings

import torch

import probes
from chisel.attribution.geometry import FeatureBlock
from chisel.attribution.transport import Transport
from chisel.attribution.weights import LinearWeight
from chisel.errors import ChiselError

Blocks = dict[str, tuple[FeatureBlock | None, FeatureBlock | None]]


class AttributionInputError(ChiselError, ValueError):
    """The run, model, features or options given to `chisel.attribute` do not fit together."""


def feature_blocks(
    weights: list[LinearWeight],
    features: probes.FeatureSet,
    dtype: torch.dtype,
    carried: list[Transport] = (),
) -> Blocks:
    """{weight param: (input block, output block)}: unit read directions of the features bound at
    each side; an output block may be carried back through an activation (`transport`)."""
    by_param = {}
    for t in carried:
        by_param.setdefault(t.param, []).append(t)
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


def _carried_block(
    w: LinearWeight,
    exact: FeatureBlock | None,
    transports: list[Transport],
    features: probes.FeatureSet,
    dtype: torch.dtype,
) -> FeatureBlock | None:
    """Features at sites h = φ(z) of the weight's output, carried back to z (one site)."""
    if exact is not None:
        warnings.warn(
            f"chisel: {w.param} has features at its own output ({exact.sites[0]!r}) and after an "
            f"activation ({transports[0].site!r}); its write split uses the former only.",
            stacklevel=4,
        )
        return exact
    if len(transports) > 1:
        warnings.warn(
            f"chisel: {w.param} feeds several activation sites with features "
            f"({[t.site for t in transports]}); its write split uses {transports[0].site!r}.",
            stacklevel=4,
        )
    t = transports[0]
    block = _block(w, list(features.at(t.site)), w.d_out, "writes", dtype)
    back, duals = t.carry(block.directions, block.dual())
    return FeatureBlock(block.names, block.sites, back, duals)
