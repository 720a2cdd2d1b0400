"""Which kernels split each param's credit: the feature basis of each module (one
`FeatureBlock` per module, its least-squares dual Dᵀ(DDᵀ)⁺ computed once and kept by the
session), the direct API's kernels from it, and the module whose kernels split a param."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from chisel.attribution.credit_block import SampleBlock
from chisel.attribution.credit_parts import CreditError
from chisel.attribution.credit_split import CreditSession, CreditSplit
from chisel.attribution.geometry import FeatureBlock
from chisel.attribution.optim_replay import Params
from chisel.attribution.splits import Kernels, read_kernels
from chisel.capture.factor_kinds import EMBEDDING as EMBEDDING_KIND

KernelsByModule = dict[str, list[Kernels]]


class ModuleFeatures(FeatureBlock):
    """Read directions at one module's input: names, their sites, directions [F, in] (the
    credit API's name for a `FeatureBlock`, whose `dual()` is computed once per block)."""

    @classmethod
    def of(cls, value: Any) -> FeatureBlock:
        """From (site, names, D), or anything with .names, .sites, .directions (FeatureBlock)."""
        return feature_block(value)


def feature_block(value: Any) -> FeatureBlock:
    """(site, names, D [F, in]) or a FeatureBlock-like value as a FeatureBlock in float64; a
    float64 FeatureBlock of exact sites is itself (its dual shared with the other families)."""
    if isinstance(value, FeatureBlock) and not value.carried and value.directions.dtype == torch.float64:
        return value
    if hasattr(value, "directions") and hasattr(value, "names"):
        return FeatureBlock(tuple(value.names), tuple(value.sites), value.directions.to(torch.float64))
    site, names, directions = value
    names = tuple(names)
    if directions.ndim != 2 or directions.shape[0] != len(names):
        raise CreditError(
            f"features at {site!r}: {len(names)} names but directions of shape "
            f"{tuple(directions.shape)}; give D as [F, in] with one row per name."
        )
    return FeatureBlock(names, (site,) * len(names), directions.to(torch.float64))


def module_basis(session: CreditSession, module: str, value: Any) -> FeatureBlock:
    """`feature_block(value)`, kept by the session while the same value (its directions not
    changed in place) is given again: the dual is then computed once per run, not per step."""
    kept = session.bases.get(module)
    if kept is not None and kept[0] is value and kept[1] == _version(value):
        return kept[2]
    block = feature_block(value)
    session.bases[module] = (value, _version(value), block)
    return block


def _version(value: Any) -> int:
    """The in-place version counter of the given directions (D of (site, names, D))."""
    directions: Tensor = value.directions if hasattr(value, "directions") else value[2]
    return directions._version


def module_kernels(
    split: CreditSplit, gbar: Params, features_by_module: dict[str, Any], session: CreditSession
) -> KernelsByModule:
    """Uncentred input-side kernels from plain read directions (the direct API)."""
    out = {}
    for module, value in features_by_module.items():
        feats = module_basis(session, module, value)
        weight = next((b for b in split.blocks if b.module == module and not b.is_bias), None)
        if weight is None:
            continue
        weight.check_width(feats.directions)
        g = weight._as_matrix(gbar[weight.param])
        out[module] = [read_kernels(feats.names, feats.sites, feats.directions, g, duals=feats.dual())]
    return out


def owners(
    split: CreditSplit, kernels_by_module: KernelsByModule, session: CreditSession
) -> dict[str, str]:
    """{param: the module whose kernels split it}: of the factor modules sharing a param (an LM
    head tied to its embedding), the one with kernels (even with no factors at this step: a
    fused head), else the first with factors."""
    owner: dict[str, str] = {}
    for b in split.blocks:
        owner.setdefault(b.param, b.module)
    for module in kernels_by_module:
        param = session.param_of(module)
        if param is not None and owner.get(param) not in kernels_by_module:
            owner[param] = module
    return owner


def block_sides(
    b: SampleBlock, kernels_by_module: KernelsByModule, owner: dict[str, str]
) -> list[Kernels]:
    """The kernels that split block b's terms: its module's, or for a tied embedding weight
    the LM head's (so the param's feature rows still sum to its integrated row)."""
    sides = kernels_by_module.get(b.module, [])
    if not sides and b.kind == EMBEDDING_KIND and owner.get(b.param) != b.module:
        sides = kernels_by_module.get(owner[b.param], [])
    return sides
