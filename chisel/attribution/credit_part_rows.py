"""The rows of a step's sample-less parts (weight decay, the unresolved parts, the residual),
whole and split by the same kernels as the samples, and the step's diagnostics: the shares of
the update that no sample is credited with."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from chisel.attribution import ledger as L
from chisel.attribution.credit_basis import KernelsByModule
from chisel.attribution.credit_frame import Columns, columns
from chisel.attribution.credit_parts import (
    GRADIENT_UNRESOLVED,
    MOMENTUM_UNRESOLVED,
    NOT_CAPTURED_SHARE,
    SAMPLE_LESS,
)
from chisel.attribution.credit_split import CreditSession, CreditSplit
from chisel.attribution.optim_replay import GRADIENT, Params


def part_rows(
    t: int,
    split: CreditSplit,
    gbar: Params,
    kernels_by_module: KernelsByModule,
    session: CreditSession,
    owner: dict[str, str],
    feature_rows: str,
) -> list[Columns]:
    """Per sample-less leaf and param: its whole row ⟨part, ḡ⟩ and (unless feature_rows is
    "none") its rows split by the param's kernels."""
    out = []
    for leaf in SAMPLE_LESS:
        parts = split.unresolved[leaf] if leaf in split.unresolved else split.base.parts[leaf]
        for param, value in parts.items():
            sides = kernels_by_module.get(owner.get(param, ""), [])
            site = sides[0].sites[-1] if sides else ""
            out.append(
                columns(t, leaf, param, site, L.WHOLE, np.array([float((value * gbar[param]).sum())]))
            )
            if feature_rows != "none":
                out += _leaf_feature_rows(t, leaf, param, value, kernels_by_module, session, owner)
    return out


def _leaf_feature_rows(
    t: int,
    leaf: str,
    param: str,
    value: Tensor,
    kernels_by_module: KernelsByModule,
    session: CreditSession,
    owner: dict[str, str],
) -> list[Columns]:
    """A sample-less part split by the same kernels, so a feature's credit rows over all parts
    sum to its integrated row. `owner`: {param: module} from this step's factor blocks
    (parameter names need not be module paths)."""
    path, _, kind_of = param.rpartition(".")
    module = owner.get(param, path)
    out = []
    for kernels in kernels_by_module.get(module, []):
        if kind_of == "bias":
            if kernels.bias is None:
                continue
            shares = kernels.bias_shares(value)
        else:
            transposed = session.kind(module) == "conv1d"
            shares = kernels.shares(value.T if transposed else value)
        out.append(
            columns(t, leaf, param, np.array(kernels.sites, dtype=object),
                    np.array(kernels.labels, dtype=object), shares.numpy(), quantity=kernels.quantity)
        )
    return out


def diagnostic_rows(t: int, split: CreditSplit) -> list[Columns]:
    """The step's momentum-unresolved share, then the not-captured share of each param."""
    return [_unresolved_share_row(t, split), *_not_captured_rows(t, split)]


def _not_captured_rows(t: int, split: CreditSplit) -> list[Columns]:
    """Per param with uncaptured factor modules at step t: ‖gradient (unresolved)‖ / ‖gradient‖,
    the share of its gradient part no sample is credited with (site: the modules, by path)."""
    out = []
    for param, modules in split.not_captured.items():
        left = float(split.unresolved[GRADIENT_UNRESOLVED][param].norm())
        whole = float(split.base.parts[GRADIENT][param].norm())
        out.append(columns(t, GRADIENT_UNRESOLVED, param, ",".join(modules), L.DIAGNOSTIC,
                           np.array([left / whole if whole else 0.0]), quantity=NOT_CAPTURED_SHARE))
    return out


def _unresolved_share_row(t: int, split: CreditSplit) -> Columns:
    """‖momentum (unresolved)‖ / ‖Δθ‖ over all params: how much of the update the samples within
    the horizon leave unexplained (0 without momentum)."""
    update = float(_flat(split.base.update).norm())
    left = float(_flat(split.unresolved[MOMENTUM_UNRESOLVED]).norm())
    value = left / update if update else 0.0
    return columns(
        t, MOMENTUM_UNRESOLVED, "", "", L.DIAGNOSTIC, np.array([value]),
        quantity=L.MOMENTUM_UNRESOLVED_SHARE,
    )


def _flat(parts: Params) -> Tensor:
    return torch.cat([v.reshape(-1) for v in parts.values()])
