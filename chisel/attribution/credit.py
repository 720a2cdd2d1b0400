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

The work is done in stages, each a module, data flowing one way:

    credit_parts        the leaves' names, the horizon's defaults, CreditError
    credit_factors      one step's recorded factors as credit reads them (float64, c folded in)
    credit_block        SampleBlock: one param's terms from one step's samples (factors)
    credit_split        CreditSession / CreditSplit: each update over the samples in reach
    credit_basis        the kernels that split each param (one FeatureBlock per module)
    credit_frame        row chunks (numpy columns) and the step's DataFrame
    credit_tags         tag columns and groups; rows summed within tag groups
    credit_values       the numbers of a group of blocks (per sample, per tag group, summed)
    credit_sample_rows  the rows of the sample blocks
    credit_part_rows    the rows of the sample-less parts, and the step's diagnostics
    credit (here)       credit_rows, credit_by, sign_of and the engine's hook
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from chisel.attribution import ledger as L
from chisel.attribution.credit_basis import (  # noqa: F401  (re-exported: the credit API)
    KernelsByModule,
    ModuleFeatures,
    module_kernels,
    owners,
)
from chisel.attribution.credit_frame import PART, Columns, frame_of, ordered  # noqa: F401  (PART)
from chisel.attribution.credit_part_rows import diagnostic_rows, part_rows
from chisel.attribution.credit_parts import (  # noqa: F401  (re-exported: the credit API)
    GRADIENT_UNRESOLVED,
    LEAVES,
    MAX_HORIZON,
    MIN_WEIGHT,
    MOMENTUM_UNRESOLVED,
    NOT_CAPTURED_SHARE,
    CreditError,
)
from chisel.attribution.credit_sample_rows import block_groups, group_rows
from chisel.attribution.credit_split import (  # noqa: F401  (re-exported: the credit API)
    CreditSession,
    CreditSplit,
    SampleBlock,
    split_update,
)
from chisel.attribution.credit_tags import OriginTags, aggregate_samples, sum_by_tags
from chisel.attribution.credit_values import split_cached  # noqa: F401  (re-exported)
from chisel.attribution.optim_replay import Params
from chisel.attribution.splits import Kernels
from chisel.store.reader import Run

FEATURE_ROWS = ("sample", "summed", "none")


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
            (uncentred). The session keeps each module's basis (its dual) while the same value
            is given again.
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
        kernels_by_module = module_kernels(split, gbar, features_by_module or {}, session)
    owner = owners(split, kernels_by_module, session)
    parts = ordered(part_rows(t, split, gbar, kernels_by_module, session, owner, feature_rows), -1.0)
    # rows in the order of the blocks (each block's whole rows, then its feature rows per side),
    # though they are computed per group of blocks
    tags = OriginTags(session, by if by is not None and feature_rows != "sample" else None)
    wholes: list[Columns] = []
    features: list[Columns] = []
    for group in block_groups(split, kernels_by_module, owner):
        whole, split_rows = group_rows(
            t, split, group, gbar[group.blocks[0].param], tags, feature_rows
        )
        wholes.append(whole)
        features += split_rows
    tail = ordered(diagnostic_rows(t, split), np.inf)
    return _assemble(parts + features, wholes, tail, tags, by)


def _assemble(
    frames: list[Columns], wholes: list[Columns], tail: list[Columns], tags: OriginTags,
    by: Sequence[str] | None,
) -> pd.DataFrame:
    """The step's frame: part and feature rows, whole rows (summed by tags when `tags.by`; per
    sample rows summed by `by` after the frame is built otherwise), diagnostics last."""
    if tags.by is None:
        frame = frame_of(frames + wholes + tail)
        return frame if by is None else aggregate_samples(frame, by)  # per-sample feature rows
    tags.check()
    frame = frame_of(frames + tail)
    summed = sum_by_tags(wholes, tags.by)
    return pd.concat([frame, frame_of([summed])], ignore_index=True) if summed else frame


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
    run: Run, horizon: int | None, by: Sequence[str] | None = None, *, start: tuple[int, int] | None = None
) -> Callable[[int, Params, dict[str, list[Kernels]]], pd.DataFrame]:
    """For `chisel.attribute`: a callable (t, ḡ, {module: kernels}) -> credit rows.

    start: (origin, step) brings the session's optimizer replay to its state before `step`,
    replayed from the state stored before `origin` (the Ray engine's tasks start mid-run so)."""
    if not run.manifest.get("config", {}).get("grads"):
        raise CreditError(
            "credit needs the gradients the optimizer consumed; this run was recorded with "
            "grads=False. Record with grads=True (the default) or leave 'credit' out of families."
        )
    session = CreditSession(run, horizon=horizon)
    if start is not None:
        session.replay.replay_from(*start)

    def rows(t: int, gbar: Params, kernels: dict[str, list[Kernels]]) -> pd.DataFrame:
        return credit_rows(
            run, t, gbar, kernels_by_module=kernels, session=session, feature_rows="summed", by=by
        )

    return rows
