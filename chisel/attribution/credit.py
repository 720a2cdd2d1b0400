"""Credit: which training samples (of this step and, through momentum, of earlier steps) made
each update, attributed to the metric and to the features at each weight's input.

The update's `gradient` part (see `optim_replay`) is κ ⊙ G_t with G_t = c·Σ_i g_i x_iᵀ for a
Linear weight (c: clip / loss-scale coefficient): sample i's term is κ ⊙ (c·g_i x_iᵀ), the bias's
κ ⊙ (c·Σ g_i). The `momentum` part is carry ⊙ buf_{t−1} with buf_{t−1} = Σ_s ω_s G_s + …, so a
sample of an earlier step s gets carry·ω_s ⊙ (c_s·g_{s,i} x_{s,i}ᵀ). What factors do not cover
(params without factors, weight decay carried in buffers, steps beyond the horizon, rounding of
c) stays as `gradient (unresolved)` / `momentum (unresolved)`. Everything closes:

    Δθ = weight_decay + Σ samples(gradient) + gradient (unresolved)
         + Σ samples(momentum) + momentum (unresolved) + residual

Attribution to the metric is ⟨part, ḡ⟩; for a sample term ⟨K_coef ⊙ g xᵀ, ḡ⟩ = gᵀ(coef ⊙ ḡ)x,
computed for all samples at once without per-sample gradients. Over features, a sample's term
gets ⟨term, R_k⟩ for the kernels R_k of `splits` (the same kernels as the integrated family, so
a feature's credit rows sum to its integrated row for any optimizer).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from chisel.attribution import ledger as L
from chisel.attribution.credit_split import (  # noqa: F401  (re-exported: the credit API)
    GRADIENT_UNRESOLVED,
    LEAVES,
    MAX_HORIZON,
    MIN_WEIGHT,
    MOMENTUM_UNRESOLVED,
    NOT_CAPTURED_SHARE,
    CreditError,
    CreditSession,
    CreditSplit,
    SampleBlock,
    _fits,
    split_update,
)
from chisel.attribution.optim_replay import GRADIENT, RESIDUAL, WEIGHT_DECAY, Params
from chisel.attribution.splits import _CHUNK_ELEMENTS, Kernels, read_kernels
from chisel.capture.factor_kinds import EMBEDDING as EMBEDDING_KIND
from chisel.store.reader import Run

# -- rows ----------------------------------------------------------------------------------------
PART = L.PART  # ledger column: which leaf of the split a credit row belongs to
FEATURE_ROWS = ("sample", "summed", "none")


@dataclass(frozen=True)
class ModuleFeatures:
    """Read directions at one module's input: names, their sites, directions [F, in]."""

    names: tuple[str, ...]
    sites: tuple[str, ...]
    directions: Tensor  # [F, in]

    @functools.cached_property
    def dual(self) -> Tensor:
        """Dᵀ(DDᵀ)⁺ [in, F], computed once per module rather than once per sample block."""
        d = self.directions
        return d.T @ torch.linalg.pinv(d @ d.T)

    @classmethod
    def of(cls, value: Any) -> ModuleFeatures:
        """From (site, names, D), or anything with .names, .sites, .directions (FeatureBlock)."""
        if isinstance(value, ModuleFeatures):
            return value
        if hasattr(value, "directions") and hasattr(value, "names"):
            return cls(tuple(value.names), tuple(value.sites), value.directions.to(torch.float64))
        site, names, directions = value
        names = tuple(names)
        if directions.ndim != 2 or directions.shape[0] != len(names):
            raise CreditError(
                f"features at {site!r}: {len(names)} names but directions of shape "
                f"{tuple(directions.shape)}; give D as [F, in] with one row per name."
            )
        return cls(names, (site,) * len(names), directions.to(torch.float64))


def _tag_columns(tags: dict[str, Any], n: int) -> dict[str, np.ndarray]:
    """Tags of a step as ledger columns for its n samples: per-sample arrays and numeric scalars."""
    out = {}
    for name, value in tags.items():
        if isinstance(value, Tensor) and value.ndim == 1 and value.shape[0] == n:
            out[L.TAG_PREFIX + name] = value.double().numpy()
        elif isinstance(value, (bool, int, float)):
            out[L.TAG_PREFIX + name] = np.full(n, float(value))
    return out


def _rows(
    t: int,
    part: str,
    param: str,
    site: str | np.ndarray,
    feature: str | np.ndarray,
    value: np.ndarray,
    sample: np.ndarray | None = None,
    origin: int | None = None,
    tags: dict[str, np.ndarray] | None = None,
    quantity: str = L.ATTRIBUTION,
) -> dict[str, np.ndarray]:
    """Columns of n rows as numpy arrays (one DataFrame is built per step, not per block)."""
    n = len(value)

    def full(v: Any) -> np.ndarray:
        return v if isinstance(v, np.ndarray) else np.full(n, v, dtype=object)

    cols: dict[str, np.ndarray] = {
        L.STEP: np.full(n, t, dtype=np.int64),
        L.FAMILY: full(L.CREDIT),
        PART: full(part),
        L.PARAM: full(param),
        L.SITE: full(site),
        L.FEATURE: full(feature),
        L.QUANTITY: full(quantity),
        L.VALUE: np.asarray(value, dtype=np.float64),
        L.SAMPLE: np.asarray(sample, dtype=np.float64) if sample is not None else np.full(n, np.nan),
        L.ORIGIN_STEP: np.full(n, np.nan if origin is None else float(origin)),
    }
    cols.update(tags or {})
    return cols


def _frame(chunks: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    """One DataFrame from column chunks; a column a chunk lacks is null there. Rows are stably
    sorted by an `_ORDER` column when the chunks have one (it is dropped)."""
    names = list(dict.fromkeys(k for c in chunks for k in c))
    data = {}
    for name in names:
        parts = []
        for c in chunks:
            n = len(c[L.VALUE])
            parts.append(c[name] if name in c else np.full(n, np.nan))
        data[name] = np.concatenate(parts) if parts else np.zeros(0)
    order = data.pop(_ORDER, None)
    if order is not None:
        perm = np.argsort(order, kind="stable")
        data = {name: v[perm] for name, v in data.items()}
    frame = pd.DataFrame(data)
    for col in (L.SAMPLE, L.ORIGIN_STEP, L.COUNT):
        if col in frame:
            frame[col] = frame[col].astype("Int64")
    return frame


def _module_kernels(
    split: CreditSplit, gbar: Params, features_by_module: dict[str, Any]
) -> dict[str, list[Kernels]]:
    """Uncentred input-side kernels from plain read directions (the direct API)."""
    out = {}
    for module, value in features_by_module.items():
        feats = ModuleFeatures.of(value)
        weight = next((b for b in split.blocks if b.module == module and not b.is_bias), None)
        if weight is None:
            continue
        weight.check_width(feats.directions)
        g = weight._as_matrix(gbar[weight.param])
        out[module] = [read_kernels(feats.names, feats.sites, feats.directions, g)]
    return out


def credit_rows(
    run: Run,
    t: int,
    gbar: Params,
    *,
    features_by_module: dict[str, Any] | None = None,
    kernels_by_module: dict[str, list[Kernels]] | None = None,
    session: CreditSession | None = None,
    horizon: int | None = None,
    feature_rows: str = "sample",
    by: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The credit rows of step t: ⟨leaf, ḡ⟩ for every leaf of the split, per param and sample.

    Args:
        gbar: {param: float64 tensor}, the path-averaged gradient of the metric at step t.
        features_by_module: {module: (site, names, D [F, in])} (or a FeatureBlock / ModuleFeatures)
            read directions at the module's input; each sample's share is split over them
            (uncentred).
        kernels_by_module: {module: [Kernels, …]} as `chisel.attribute` builds them (centred
            input side, output side); overrides `features_by_module`.
        session: a `CreditSession` kept across consecutive steps (made here if None).
        horizon: earlier steps given momentum credit (see `CreditSession`).
        feature_rows: "sample" (one row per sample and feature), "summed" (feature rows summed
            over each block's samples, `sample` null) or "none".
        by: per-sample tag names; when given, the whole-sample rows are summed within the
            groups of these tags (`sample` null, `count` the group's size), as `chisel.attribute`'s
            `credit_by` does (the sums are formed before any row is built).

    Returns:
        columns step, family="credit", part, param, site, feature, quantity="attribution", value,
        sample, origin_step, tag/<name>…. The rows with feature "" sum to ⟨Δθ_t, ḡ⟩; the
        feature rows (names and "<residual>") of a sample (or block) sum to its "" row.
    """
    if feature_rows not in FEATURE_ROWS:
        raise CreditError(f"feature_rows={feature_rows!r}; use one of {FEATURE_ROWS}.")
    session = session if session is not None else CreditSession(run, horizon=horizon)
    split = split_update(run, t, session)
    missing = [n for n in split.base.update if n not in gbar]
    if missing:
        raise CreditError(
            f"gbar lacks {missing[:5]}; give ḡ for every recorded param ({len(split.base.update)})."
        )
    gbar = {n: v.to(torch.float64) for n, v in gbar.items()}
    if kernels_by_module is None:
        kernels_by_module = _module_kernels(split, gbar, features_by_module or {})
    owner = _owners(split, kernels_by_module, session)
    frames = []
    for leaf in (WEIGHT_DECAY, GRADIENT_UNRESOLVED, MOMENTUM_UNRESOLVED, RESIDUAL):
        parts = split.unresolved[leaf] if leaf in split.unresolved else split.base.parts[leaf]
        for param, value in parts.items():
            sides = kernels_by_module.get(owner.get(param, ""), [])
            site = sides[0].sites[-1] if sides else ""
            frames.append(
                _rows(t, leaf, param, site, L.WHOLE, np.array([float((value * gbar[param]).sum())]))
            )
            if feature_rows != "none":
                frames += _leaf_feature_rows(
                    t, leaf, param, value, kernels_by_module, session, owner
                )
    # rows in the order of the blocks (each block's whole rows, then its feature rows per side),
    # though they are computed per group of blocks; `_ORDER` holds the position, dropped later
    grouping = by if by is not None and feature_rows != "sample" else None
    tags = _OriginTags(session, grouping)
    position = {id(b): i for i, b in enumerate(split.blocks)}
    for chunk in frames:
        chunk[_ORDER] = np.full(len(chunk[L.VALUE]), -1.0)
    wholes: list[dict[str, np.ndarray]] = []
    for group in _groups(split.blocks):
        b = group[0]
        sides = kernels_by_module.get(b.module, [])
        if not sides and b.kind == EMBEDDING_KIND and owner.get(b.param) != b.module:
            # a tied weight: the LM head's features split the embedding's terms too, so the
            # param's feature rows still sum to its integrated row
            sides = kernels_by_module.get(owner[b.param], [])
        at = np.array([position[id(x)] for x in group], dtype=np.float64) * _SLOTS
        whole, features = _group_rows(t, split, group, gbar[b.param], sides, tags, feature_rows, at)
        wholes.append(whole)
        frames += features
    tail = [_unresolved_share_row(t, split), *_not_captured_rows(t, split)]
    for chunk in tail:
        chunk[_ORDER] = np.full(len(chunk[L.VALUE]), np.inf)
    if grouping is None:
        frame = _frame(frames + wholes + tail)
        return frame if by is None else _aggregate_samples(frame, by)  # per-sample feature rows
    tags.check()
    frame = _frame(frames + tail)
    summed = _sum_by_tags(wholes, tags.by)
    return pd.concat([frame, _frame([summed])], ignore_index=True) if summed else frame


# sort keys of a block's rows: its whole rows, then one slot per side of kernels
_ORDER, _SLOTS = "_order", 64


def _groups(blocks: list[SampleBlock]) -> list[list[SampleBlock]]:
    """Blocks of one (part, module, param), in order of first appearance: this step's block, or
    the earlier steps' blocks of one param that momentum carries (they share one coef)."""
    out: dict[tuple[str, str, str], list[SampleBlock]] = {}
    for b in blocks:
        out.setdefault((b.part, b.module, b.param), []).append(b)
    return list(out.values())


class _OriginTags:
    """Per origin step: its tag columns, one value per sample (computed once per call)."""

    def __init__(self, session: CreditSession, by: Sequence[str] | None) -> None:
        self.session, self.by = session, None if by is None else [L.TAG_PREFIX + b for b in by]
        self._columns: dict[int, dict[str, np.ndarray]] = {}
        self.seen: set[str] = set()

    def columns(self, s: int, n: int) -> dict[str, np.ndarray]:
        if s not in self._columns:
            factors = self.session.factors(s)
            self._columns[s] = _tag_columns(factors.tags if factors else {}, n)
            self.seen.update(self._columns[s])
        return self._columns[s]

    def groups(self, s: int, n: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(codes [n] of the samples' groups, {tag column: [groups] value}, [groups] sizes) by
        the `by` tags, groups in order of first appearance, a missing or NaN tag its own group."""
        assert self.by is not None
        self.columns(s, n)  # the tags seen (for `check`)
        return self.session.cached(s, ("tag groups", tuple(self.by)), lambda: self._groups(s, n))

    def _groups(self, s: int, n: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        assert self.by is not None
        cols = self.columns(s, n)
        values = [cols[c] if c in cols else np.full(n, np.nan) for c in self.by]
        codes = np.zeros(n, dtype=np.int64)
        for v in values:
            c, uniq = pd.factorize(v, use_na_sentinel=False)
            codes = codes * max(1, len(uniq)) + c
        codes, _ = pd.factorize(codes)
        first = np.unique(codes, return_index=True)[1]
        keys = {c: v[first] for c, v in zip(self.by, values, strict=True)}
        return codes, keys, np.bincount(codes, minlength=len(first))

    def check(self) -> None:
        """The `by` tags must be per-sample numeric tags of the samples credited at this step."""
        assert self.by is not None
        missing = [c for c in self.by if c not in self.seen]
        if missing:
            raise CreditError(
                f"credit_by: no per-sample numeric tag {missing} at this step (numeric tags "
                f"here: {sorted(self.seen)}). Groups need one number per "
                "sample: tag it at every step, and map strings to codes (e.g. a tensor of ints)."
            )


_GROUP_KEYS = (L.STEP, L.FAMILY, L.PART, L.PARAM, L.SITE, L.FEATURE, L.QUANTITY, L.ORIGIN_STEP)


def _sum_by_tags(chunks: list[dict[str, np.ndarray]], by: list[str]) -> dict[str, np.ndarray] | None:
    """Whole rows (chunks with `_ORDER` keys; per sample, or per tag group with a `count`)
    summed within the groups of the tag columns
    `by` and of the other keys, as `_aggregate_samples` sums the rows in block order: groups in
    order of first appearance, a NaN tag its own group, each group summed in row order."""
    if not chunks:
        return None
    n = [len(c[L.VALUE]) for c in chunks]
    order = np.argsort(np.concatenate([c[_ORDER] for c in chunks]), kind="stable")
    ids: dict[tuple, int] = {}  # (part, param, site) of each chunk: constant within it
    key = np.repeat([ids.setdefault((c[PART][0], c[L.PARAM][0], c[L.SITE][0]), len(ids))
                     for c in chunks], n)[order]
    origin = np.concatenate([c[L.ORIGIN_STEP] for c in chunks])[order]
    codes, _ = pd.factorize(key * (int(origin.max()) + 1) + origin.astype(np.int64))
    columns = {}
    for name in by:  # a tag an origin step lacks is NaN there
        values = [c[name] if name in c else np.full(m, np.nan) for c, m in zip(chunks, n, strict=True)]
        columns[name] = np.concatenate(values)[order]
        tag_codes, uniq = pd.factorize(columns[name], use_na_sentinel=False)
        codes = codes * max(1, len(uniq)) + tag_codes
    codes, _ = pd.factorize(codes)  # renumbered by first appearance
    first = np.unique(codes, return_index=True)[1]
    at = order[first]  # each group's first row, as an index into the chunks' rows
    chunk_of = np.searchsorted(np.cumsum(n), at, side="right")
    out = {}
    for k in _GROUP_KEYS:  # constant within a chunk, but the origin step
        if k == L.ORIGIN_STEP:
            out[k] = np.concatenate([c[k] for c in chunks])[at]
            continue
        per_chunk = np.empty(len(chunks), dtype=chunks[0][k].dtype)
        per_chunk[:] = [c[k][0] for c in chunks]
        out[k] = per_chunk[chunk_of]
    out.update({name: v[first] for name, v in columns.items()})
    values = np.concatenate([c[L.VALUE] for c in chunks])[order]
    out[L.VALUE] = np.bincount(codes, weights=values)
    out[L.SAMPLE] = np.full(len(first), np.nan)
    counts = np.concatenate([c[L.COUNT] if L.COUNT in c else np.ones(m) for c, m in zip(chunks, n, strict=True)])
    out[L.COUNT] = np.bincount(codes, weights=counts[order])  # rows already summed count theirs
    return out


def _whole_values(split: CreditSplit, group: list[SampleBlock], gbar: Tensor) -> list[Tensor]:
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
    per_row = []
    chunk = max(1, _CHUNK_ELEMENTS // max(1, max(a.shape)))
    for s in range(0, g.shape[0], chunk):
        gs, xs = g[s : s + chunk], x[s : s + chunk]
        if a.shape[1] >= a.shape[0]:
            per_row.append(((gs @ a) * xs).sum(1))  # reads H = g A, ⟨H, x⟩
        else:
            per_row.append(((xs @ a.T) * gs).sum(1))  # A x, ⟨g, A x⟩: the narrower side
    rows = torch.cat(per_row).split([x.g.shape[0] * x.g.shape[1] for x in group])
    return [r.reshape(x.n, -1).sum(1) * w for r, x, w in zip(rows, group, scales, strict=True)]


def _summed_shares(
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


def _sample_whole(
    t: int, split: CreditSplit, group: list[SampleBlock], gbar: Tensor, site: str,
    tags: _OriginTags, at: np.ndarray,
) -> dict[str, np.ndarray]:
    """One whole row per sample of every block of the group, with the samples' tags."""
    b = group[0]
    values = np.concatenate([v.numpy() for v in _whole_values(split, group, gbar)])
    columns = [tags.columns(x.origin_step, x.n) for x in group]
    names = list(dict.fromkeys(c for cols in columns for c in cols))
    per_tag = {  # a tag an origin step lacks is NaN there
        c: np.concatenate([cols[c] if c in cols else np.full(x.n, np.nan)
                           for x, cols in zip(group, columns, strict=True)])
        for c in names
    }
    sizes = [x.n for x in group]
    whole = _rows(t, b.part, b.param, site, L.WHOLE, values,
                  np.concatenate([np.arange(n) for n in sizes]), None, per_tag)
    whole[L.ORIGIN_STEP] = np.repeat([float(x.origin_step) for x in group], sizes)
    whole[_ORDER] = np.repeat(at, sizes)
    return whole


def _grouped_whole(
    t: int, split: CreditSplit, group: list[SampleBlock], gbar: Tensor, site: str,
    tags: _OriginTags, at: np.ndarray,
) -> dict[str, np.ndarray]:
    """One whole row per tag group of every block: ⟨shared ⊙ ḡ, Σ_{i∈group} layout(g_i, x_i)⟩
    times the block's scale, from per-group sums of each origin step's terms that the session
    keeps (formed once per origin step, not once per update): no per-sample work per update."""
    b = group[0]
    shared = split.shared_coef(b)[0]
    read = (shared * gbar).reshape(-1)
    assert tags.by is not None
    values, keys, sizes = [], [], []
    for x in group:
        codes, tag_keys, counts = tags.groups(x.origin_step, x.n)

        def sums(x: SampleBlock = x, codes: np.ndarray = codes, k: int = len(counts)) -> Tensor:
            member = torch.from_numpy(codes)
            return torch.stack([
                dataclasses.replace(x, g=x.g * (member == j).to(x.g.dtype)[:, None, None])
                .raw_total(gbar.shape).reshape(-1) for j in range(k)
            ])  # [groups, numel]

        if _fits(x, len(counts) * gbar.numel()):
            per_group = split_cached(tags.session, x, tuple(tags.by), sums)
            values.append(((per_group @ read) * split.shared_coef(x)[1]).numpy())
        else:  # the groups' sums would outweigh the factors: sum the per-sample values
            per_sample = _whole_values(split, [x], gbar)[0].numpy()
            values.append(np.bincount(codes, weights=per_sample, minlength=len(counts)))
        keys.append({**tag_keys, L.COUNT: counts.astype(np.float64)})
        sizes.append(len(counts))
    columns = {c: np.concatenate([k[c] for k in keys]) for c in keys[0]}
    count = columns.pop(L.COUNT)
    rows = _rows(t, b.part, b.param, site, L.WHOLE, np.concatenate(values), None, None, columns)
    rows[L.COUNT] = count
    rows[L.ORIGIN_STEP] = np.repeat([float(x.origin_step) for x in group], sizes)
    rows[_ORDER] = np.repeat(at, sizes)
    return rows


def split_cached(session: CreditSession, b: SampleBlock, by: tuple[str, ...], make) -> Tensor:
    """The per-group sums of block b's origin step (see `_grouped_whole`), kept by the session."""
    return session.cached(b.origin_step, ("groups", b.module, b.param, by), make)


def _group_rows(
    t: int,
    split: CreditSplit,
    group: list[SampleBlock],
    gbar: Tensor,
    sides: list[Kernels],
    tags: _OriginTags,
    mode: str,
    at: np.ndarray,
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """(whole-sample rows, feature rows) of a group of blocks (see `_groups`). at: [blocks] the
    blocks' sort keys (`_ORDER`: their whole rows there, side j's rows at key + 1 + j)."""
    b = group[0]
    site = sides[0].sites[-1] if sides else ""
    if tags.by is not None:
        whole = _grouped_whole(t, split, group, gbar, site, tags, at)
    else:
        whole = _sample_whole(t, split, group, gbar, site, tags, at)
    features: list[dict[str, np.ndarray]] = []
    if mode == "none":
        return whole, features
    for j, kernels in enumerate(sides):
        if b.is_bias and kernels.bias is None:
            continue
        names = np.array(kernels.labels, dtype=object)
        sites = np.array(kernels.sites, dtype=object)
        k = len(names)
        if mode == "summed":  # linear: each block's total split once, no per-sample shares
            shares = _summed_shares(split, group, gbar, kernels).numpy()  # [blocks, K]
            rows = _rows(t, b.part, b.param, np.tile(sites, len(group)), np.tile(names, len(group)),
                         shares.reshape(-1), None, None, quantity=kernels.quantity)
            rows[L.ORIGIN_STEP] = np.repeat([float(x.origin_step) for x in group], k)
            rows[L.COUNT] = np.repeat([float(x.n) for x in group], k)
            rows[_ORDER] = np.repeat(at + 1 + j, k)
            features.append(rows)
            continue
        for x, key in zip(group, at, strict=True):
            values = x.kernel_shares(gbar, kernels)  # [n, K]
            per_row = {c: np.repeat(v, k) for c, v in tags.columns(x.origin_step, x.n).items()}
            rows = _rows(t, x.part, x.param, np.tile(sites, x.n), np.tile(names, x.n),
                         values.reshape(-1).numpy(), np.repeat(np.arange(x.n), k), x.origin_step,
                         per_row, kernels.quantity)
            rows[_ORDER] = np.full(x.n * k, key + 1 + j)
            features.append(rows)
    return whole, features


def _owners(
    split: CreditSplit, kernels_by_module: dict[str, list[Kernels]], session: CreditSession
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


def _not_captured_rows(t: int, split: CreditSplit) -> list[dict[str, np.ndarray]]:
    """Per param with uncaptured factor modules at step t: ‖gradient (unresolved)‖ / ‖gradient‖,
    the share of its gradient part no sample is credited with (site: the modules, by path)."""
    out = []
    for param, modules in split.not_captured.items():
        left = float(split.unresolved[GRADIENT_UNRESOLVED][param].norm())
        whole = float(split.base.parts[GRADIENT][param].norm())
        out.append(_rows(t, GRADIENT_UNRESOLVED, param, ",".join(modules), L.DIAGNOSTIC,
                         np.array([left / whole if whole else 0.0]), quantity=NOT_CAPTURED_SHARE))
    return out


def _leaf_feature_rows(
    t: int,
    leaf: str,
    param: str,
    value: Tensor,
    kernels_by_module: dict,
    session: CreditSession,
    owner: dict[str, str],
) -> list[dict[str, np.ndarray]]:
    """A sample-less part (weight decay, unresolved, residual) split by the same kernels, so a
    feature's credit rows over all parts sum to its integrated row. `owner`: {param: module}
    from this step's factor blocks (parameter names need not be module paths)."""
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
            _rows(t, leaf, param, np.array(kernels.sites, dtype=object),
                  np.array(kernels.labels, dtype=object), shares.numpy(), quantity=kernels.quantity)
        )
    return out


def _unresolved_share_row(t: int, split: CreditSplit) -> dict[str, np.ndarray]:
    """‖momentum (unresolved)‖ / ‖Δθ‖ over all params: how much of the update the samples within
    the horizon leave unexplained (0 without momentum)."""
    flat = lambda parts: torch.cat([v.reshape(-1) for v in parts.values()])  # noqa: E731
    update = float(flat(split.base.update).norm())
    left = float(flat(split.unresolved[MOMENTUM_UNRESOLVED]).norm())
    value = left / update if update else 0.0
    return _rows(
        t, MOMENTUM_UNRESOLVED, "", "", L.DIAGNOSTIC, np.array([value]),
        quantity=L.MOMENTUM_UNRESOLVED_SHARE,
    )


# -- aggregation and the engine's hook ---------------------------------------------------------
def sign_of(tag: str) -> Callable[[pd.DataFrame], pd.Series]:
    """A `by` for `credit_by`: the sign (−1, 0, +1) of a tag, e.g. `by=sign_of("advantage")`."""
    column = tag if tag.startswith(L.TAG_PREFIX) else L.TAG_PREFIX + tag

    def key(frame: pd.DataFrame) -> pd.Series:
        return np.sign(frame[column]).rename(f"sign({tag})")

    return key


def credit_by(
    ledger: pd.DataFrame,
    by: str | Callable[[pd.DataFrame], pd.Series] = "reward",
    *,
    also: Sequence[str] = (),
) -> pd.DataFrame:
    """Sum the per-sample credit attributions by a tag (or a computed key), e.g. by reward.

    by: a tag name ("reward" or "tag/reward"), or `frame -> Series` such as `sign_of("advantage")`.
    also: more ledger columns to keep apart, e.g. ("feature",) or ("param", "part").
    Only sample rows count; without "feature" in `also`, only whole-sample rows (feature "").
    """
    rows = ledger[(ledger[L.FAMILY] == L.CREDIT) & (ledger[L.QUANTITY] == L.ATTRIBUTION)]
    rows = rows[rows[L.SAMPLE].notna()]
    if L.FEATURE not in also:
        rows = rows[rows[L.FEATURE] == L.WHOLE]
    if callable(by):
        key = by(rows)
    else:
        column = by if by.startswith(L.TAG_PREFIX) or by in rows else L.TAG_PREFIX + by
        if column not in rows:
            tags = sorted(c for c in ledger.columns if c.startswith(L.TAG_PREFIX))
            raise CreditError(f"no tag {by!r} in the ledger; its tag columns are {tags}.")
        key = rows[column]
    name = key.name or "key"
    counts = rows[L.COUNT].fillna(1) if L.COUNT in rows else pd.Series(1, index=rows.index)
    grouped = rows.assign(**{name: key, L.COUNT: counts}).groupby([name, *also], dropna=False)
    return grouped[[L.VALUE, L.COUNT]].sum().reset_index()


def engine(
    run: Run, horizon: int | None, by: Sequence[str] | None = None
) -> Callable[[int, Params, dict[str, list[Kernels]]], pd.DataFrame]:
    """For `chisel.attribute`: a callable (t, ḡ, {module: kernels}) -> credit rows."""
    if not run.manifest.get("config", {}).get("grads"):
        raise CreditError(
            "credit needs the gradients the optimizer consumed; this run was recorded with "
            "grads=False. Record with grads=True (the default) or leave 'credit' out of families."
        )
    session = CreditSession(run, horizon=horizon)

    def rows(t: int, gbar: Params, kernels: dict[str, list[Kernels]]) -> pd.DataFrame:
        return credit_rows(
            run, t, gbar, kernels_by_module=kernels, session=session, feature_rows="summed", by=by
        )

    return rows


def _aggregate_samples(frame: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per-sample rows summed within groups of the tags `by` (sample becomes null)."""
    tag_cols = [f"tag/{b}" for b in by]
    missing = [c for c in tag_cols if c not in frame.columns]
    if missing:
        raise CreditError(
            f"credit_by: no per-sample numeric tag {missing} at this step (numeric tags here: "
            f"{[c for c in frame.columns if c.startswith('tag/')]}). Groups need one number per "
            "sample: tag it at every step, and map strings to codes (e.g. a tensor of ints)."
        )
    per_sample = frame[frame[L.SAMPLE].notna()]
    keys = [*_GROUP_KEYS, *tag_cols]
    # groups in order of first appearance, each summed in row order (as `credit_rows(by=...)`)
    codes = per_sample.groupby(keys, dropna=False, sort=False).ngroup().to_numpy()
    first = np.unique(codes, return_index=True)[1]
    summed = per_sample.iloc[first][keys].reset_index(drop=True)
    summed[L.VALUE] = np.bincount(codes, weights=per_sample[L.VALUE].to_numpy(np.float64))
    summed[L.COUNT] = pd.array(np.bincount(codes), dtype="Int64")
    return pd.concat([frame[frame[L.SAMPLE].isna()], summed], ignore_index=True)
