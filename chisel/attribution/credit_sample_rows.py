"""The rows of the sample blocks of a step: blocks grouped by (part, module, param), each
group's whole rows (per sample, or per tag group) and its rows split by kernels (per sample,
or summed over each block's samples)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from chisel.attribution import ledger as L
from chisel.attribution.credit_basis import KernelsByModule, block_sides
from chisel.attribution.credit_block import SampleBlock
from chisel.attribution.credit_frame import ORDER, SLOTS, Columns, columns
from chisel.attribution.credit_split import CreditSplit
from chisel.attribution.credit_tags import OriginTags
from chisel.attribution.credit_values import grouped_values, summed_shares, whole_values
from chisel.attribution.splits import Kernels


@dataclass(frozen=True)
class BlockGroup:
    """Blocks of one (part, module, param): this step's block, or the earlier steps' blocks of
    one param that momentum carries (they share one coef), with the kernels that split them."""

    blocks: list[SampleBlock]
    sides: list[Kernels]
    at: np.ndarray  # [blocks] sort keys (`ORDER`): whole rows there, side j's at key + 1 + j

    @property
    def site(self) -> str:
        return self.sides[0].sites[-1] if self.sides else ""


def block_groups(
    split: CreditSplit, kernels_by_module: KernelsByModule, owner: dict[str, str]
) -> list[BlockGroup]:
    """The step's blocks grouped, in order of first appearance, each block's sort key its
    position in `split.blocks` (rows come out in block order though computed per group)."""
    position = {id(b): i for i, b in enumerate(split.blocks)}
    grouped: dict[tuple[str, str, str], list[SampleBlock]] = {}
    for b in split.blocks:
        grouped.setdefault((b.part, b.module, b.param), []).append(b)
    out = []
    for group in grouped.values():
        at = np.array([position[id(x)] for x in group], dtype=np.float64) * SLOTS
        out.append(BlockGroup(group, block_sides(group[0], kernels_by_module, owner), at))
    return out


def group_rows(
    t: int, split: CreditSplit, group: BlockGroup, gbar: Tensor, tags: OriginTags, mode: str
) -> tuple[Columns, list[Columns]]:
    """(whole rows, feature rows) of a group of blocks; gbar: ḡ of the group's param."""
    if tags.by is not None:
        whole = _grouped_whole(t, split, group, gbar, tags)
    else:
        whole = _sample_whole(t, split, group, gbar, tags)
    features: list[Columns] = []
    if mode == "none":
        return whole, features
    b = group.blocks[0]
    for j, kernels in enumerate(group.sides):
        if b.is_bias and kernels.bias is None:
            continue
        if mode == "summed":  # linear: each block's total split once, no per-sample shares
            features.append(_summed_rows(t, split, group, gbar, kernels, j))
        else:
            features += _sample_feature_rows(t, group, gbar, kernels, tags, j)
    return whole, features


def _sample_whole(
    t: int, split: CreditSplit, group: BlockGroup, gbar: Tensor, tags: OriginTags
) -> Columns:
    """One whole row per sample of every block of the group, with the samples' tags."""
    blocks = group.blocks
    b = blocks[0]
    values = np.concatenate([v.numpy() for v in whole_values(split, blocks, gbar)])
    per_block = [tags.columns(x.origin_step, x.n) for x in blocks]
    names = list(dict.fromkeys(c for cols in per_block for c in cols))
    per_tag = {  # a tag an origin step lacks is NaN there
        c: np.concatenate([cols[c] if c in cols else np.full(x.n, np.nan)
                           for x, cols in zip(blocks, per_block, strict=True)])
        for c in names
    }
    sizes = [x.n for x in blocks]
    whole = columns(t, b.part, b.param, group.site, L.WHOLE, values,
                    np.concatenate([np.arange(n) for n in sizes]), None, per_tag)
    whole[L.ORIGIN_STEP] = np.repeat([float(x.origin_step) for x in blocks], sizes)
    whole[ORDER] = np.repeat(group.at, sizes)
    return whole


def _grouped_whole(
    t: int, split: CreditSplit, group: BlockGroup, gbar: Tensor, tags: OriginTags
) -> Columns:
    """One whole row per tag group of every block (`grouped_values`), with the group's tags
    and size (`count`)."""
    assert tags.by is not None
    blocks = group.blocks
    b = blocks[0]
    values, keys, sizes = [], [], []
    for x in blocks:
        groups = tags.groups(x.origin_step, x.n)
        values.append(grouped_values(split, x, gbar, groups, tags.session, tuple(tags.by)))
        keys.append({**groups.keys, L.COUNT: groups.counts.astype(np.float64)})
        sizes.append(len(groups.counts))
    per_tag = {c: np.concatenate([k[c] for k in keys]) for c in keys[0]}
    count = per_tag.pop(L.COUNT)
    rows = columns(t, b.part, b.param, group.site, L.WHOLE, np.concatenate(values), None, None,
                   per_tag)
    rows[L.COUNT] = count
    rows[L.ORIGIN_STEP] = np.repeat([float(x.origin_step) for x in blocks], sizes)
    rows[ORDER] = np.repeat(group.at, sizes)
    return rows


def _summed_rows(
    t: int, split: CreditSplit, group: BlockGroup, gbar: Tensor, kernels: Kernels, j: int
) -> Columns:
    """Side j's rows of the group, summed over each block's samples (`sample` null)."""
    blocks, b = group.blocks, group.blocks[0]
    names = np.array(kernels.labels, dtype=object)
    sites = np.array(kernels.sites, dtype=object)
    k = len(names)
    shares = summed_shares(split, blocks, gbar, kernels).numpy()  # [blocks, K]
    rows = columns(t, b.part, b.param, np.tile(sites, len(blocks)), np.tile(names, len(blocks)),
                   shares.reshape(-1), None, None, quantity=kernels.quantity)
    rows[L.ORIGIN_STEP] = np.repeat([float(x.origin_step) for x in blocks], k)
    rows[L.COUNT] = np.repeat([float(x.n) for x in blocks], k)
    rows[ORDER] = np.repeat(group.at + 1 + j, k)
    return rows


def _sample_feature_rows(
    t: int, group: BlockGroup, gbar: Tensor, kernels: Kernels, tags: OriginTags, j: int
) -> list[Columns]:
    """Side j's rows of the group, one per sample and kernel, with the samples' tags."""
    names = np.array(kernels.labels, dtype=object)
    sites = np.array(kernels.sites, dtype=object)
    k = len(names)
    out = []
    for x, key in zip(group.blocks, group.at, strict=True):
        values = x.kernel_shares(gbar, kernels)  # [n, K]
        per_row = {c: np.repeat(v, k) for c, v in tags.columns(x.origin_step, x.n).items()}
        rows = columns(t, x.part, x.param, np.tile(sites, x.n), np.tile(names, x.n),
                       values.reshape(-1).numpy(), np.repeat(np.arange(x.n), k), x.origin_step,
                       per_row, kernels.quantity)
        rows[ORDER] = np.full(x.n * k, key + 1 + j)
        out.append(rows)
    return out
