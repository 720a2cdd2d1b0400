"""The numbers of credit rows for a group of sample blocks, from their factors: every sample's
⟨term_i, ḡ⟩, per-tag-group sums of them, and the blocks' totals split by kernels. Tensors in,
tensors (or arrays) out; no rows are built here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from chisel.attribution.credit_block import SampleBlock, _fits
from chisel.attribution.credit_split import CreditSession, CreditSplit
from chisel.attribution.credit_tags import TagGroups
from chisel.attribution.splits import _CHUNK_ELEMENTS, Kernels
from chisel.capture.factor_kinds import EMBEDDING as EMBEDDING_KIND


def whole_values(split: CreditSplit, group: list[SampleBlock], gbar: Tensor) -> list[Tensor]:
    """[n_b] per block: ⟨term_i, ḡ⟩ for every sample, the group's origins in one matmul.

    Every block's coef is one shared coef times a number (`CreditSplit.shared_coef`), so the
    metric's read A = shared ⊙ ḡ is formed once and all origins' rows go through it together.
    """
    b = group[0]
    scales = [split.shared_coef(x)[1] for x in group]
    shared = split.shared_coef(b)[0]
    if b.kind == EMBEDDING_KIND:  # a gather per block, no matmul to share
        return [x.attribution(gbar) for x in group]
    read = shared * gbar
    if b.is_bias or b._norm:
        rows = torch.cat([x._rows for x in group])  # [Σn, numel]
        values = rows @ read.reshape(-1)
        return [v * w for v, w in zip(values.split([x.n for x in group]), scales, strict=True)]
    a = b._as_matrix(read)  # [out, in]
    g = torch.cat([x.g.flatten(0, 1) for x in group])  # [Σ n·T, out]
    x = torch.cat([x.x.flatten(0, 1) for x in group])  # [Σ n·T, in]
    rows = _row_reads(a, g, x).split([x.g.shape[0] * x.g.shape[1] for x in group])
    return [r.reshape(x.n, -1).sum(1) * w for r, x, w in zip(rows, group, scales, strict=True)]


def _row_reads(a: Tensor, g: Tensor, x: Tensor) -> Tensor:
    """[rows]: gᵀ A x for every row of g [rows, out] and x [rows, in], in chunks, through the
    narrower side of A [out, in]."""
    per_row = []
    chunk = max(1, _CHUNK_ELEMENTS // max(1, max(a.shape)))
    for s in range(0, g.shape[0], chunk):
        gs, xs = g[s : s + chunk], x[s : s + chunk]
        if a.shape[1] >= a.shape[0]:
            per_row.append(((gs @ a) * xs).sum(1))  # reads H = g A, ⟨H, x⟩
        else:
            per_row.append(((xs @ a.T) * gs).sum(1))  # A x, ⟨g, A x⟩: the narrower side
    return torch.cat(per_row)


def grouped_values(
    split: CreditSplit,
    x: SampleBlock,
    gbar: Tensor,
    groups: TagGroups,
    session: CreditSession,
    by: tuple[str, ...],
) -> np.ndarray:
    """[groups]: ⟨shared ⊙ ḡ, Σ_{i∈group} layout(g_i, x_i)⟩ times the block's scale, from
    per-group sums of the origin step's terms that the session keeps (formed once per origin
    step, not once per update): no per-sample work per update."""
    k = len(groups.counts)
    if not _fits(x, k * gbar.numel()):  # the groups' sums would outweigh the factors
        per_sample = whole_values(split, [x], gbar)[0].numpy()
        return np.bincount(groups.codes, weights=per_sample, minlength=k)
    read = (split.shared_coef(x)[0] * gbar).reshape(-1)

    def sums() -> Tensor:
        member = torch.from_numpy(groups.codes)
        return torch.stack([
            dataclasses.replace(x, g=x.g * (member == j).to(x.g.dtype)[:, None, None])
            .raw_total(gbar.shape).reshape(-1) for j in range(k)
        ])  # [groups, numel]

    per_group = split_cached(session, x, by, sums)
    return ((per_group @ read) * split.shared_coef(x)[1]).numpy()


def split_cached(
    session: CreditSession, b: SampleBlock, by: tuple[str, ...], make: Callable[[], Tensor]
) -> Tensor:
    """The per-group sums of block b's origin step (see `grouped_values`), kept by the session."""
    return session.cached(b.origin_step, ("groups", b.module, b.param, by), make)


def summed_shares(
    split: CreditSplit, group: list[SampleBlock], gbar: Tensor, kernels: Kernels
) -> Tensor:
    """[blocks, K]: ⟨Σ_i term_i, R_k⟩ per block, from the blocks' cached sums (one matmul)."""
    b = group[0]
    if b._norm:
        raise b._no_features()
    if not b.is_bias:
        b.check_width(kernels.weight)
    shared = split.shared_coef(b)[0]
    scales = torch.tensor([split.shared_coef(x)[1] for x in group], dtype=gbar.dtype)
    sums = torch.stack([shared * x.raw_total(gbar.shape) for x in group])  # [blocks, *param]
    if b.is_bias:
        return (sums @ kernels.bias.T) * scales[:, None]
    if b.kind == "conv1d":
        sums = sums.transpose(-1, -2)
    return (sums.flatten(1) @ kernels.weight.flatten(1).T) * scales[:, None]
