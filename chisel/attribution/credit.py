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
    split_update,
)
from chisel.attribution.optim_replay import GRADIENT, RESIDUAL, WEIGHT_DECAY, Params
from chisel.attribution.splits import Kernels, read_kernels
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
    """One DataFrame from column chunks; a column a chunk lacks is null there."""
    names = list(dict.fromkeys(k for c in chunks for k in c))
    data = {}
    for name in names:
        parts = []
        for c in chunks:
            n = len(c[L.VALUE])
            parts.append(c[name] if name in c else np.full(n, np.nan))
        data[name] = np.concatenate(parts) if parts else np.zeros(0)
    frame = pd.DataFrame(data)
    for col in (L.SAMPLE, L.ORIGIN_STEP, L.COUNT):
        if col in frame:
            frame[col] = frame[col].astype("Int64")
    return frame


def _block_rows(
    t: int, b: SampleBlock, gbar: Tensor, sides: list[Kernels], tags: dict, mode: str
) -> list[dict[str, np.ndarray]]:
    """A block's whole-sample rows and, per side's kernels, their exact split over features."""
    idx = np.arange(b.n)
    site = sides[0].sites[-1] if sides else ""
    out = [
        _rows(
            t, b.part, b.param, site, L.WHOLE, b.attribution(gbar).numpy(), idx, b.origin_step, tags
        )
    ]
    if mode == "none":
        return out
    for kernels in sides:
        if b.is_bias and kernels.bias is None:
            continue
        names = np.array(kernels.labels, dtype=object)
        sites = np.array(kernels.sites, dtype=object)
        if mode == "summed":  # linear: the block's total split once, no per-sample shares
            total = b.summed_kernel_shares(gbar, kernels).numpy()
            summed = _rows(t, b.part, b.param, sites, names, total, None, b.origin_step,
                           quantity=kernels.quantity)
            summed[L.COUNT] = np.full(len(names), float(b.n))
            out.append(summed)
            continue
        values = b.kernel_shares(gbar, kernels)  # [n, K]
        k = values.shape[1]
        per_row = {c: np.repeat(v, k) for c, v in tags.items()}
        out.append(
            _rows(
                t,
                b.part,
                b.param,
                np.tile(sites, b.n),
                np.tile(names, b.n),
                values.reshape(-1).numpy(),
                np.repeat(idx, k),
                b.origin_step,
                per_row,
                kernels.quantity,
            )
        )
    return out


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
    for b in split.blocks:
        step_factors = session.factors(b.origin_step)
        tags = _tag_columns(step_factors.tags if step_factors else {}, b.n)
        sides = kernels_by_module.get(b.module, [])
        if not sides and b.kind == EMBEDDING_KIND and owner.get(b.param) != b.module:
            # a tied weight: the LM head's features split the embedding's terms too, so the
            # param's feature rows still sum to its integrated row
            sides = kernels_by_module.get(owner[b.param], [])
        frames += _block_rows(t, b, gbar[b.param], sides, tags, feature_rows)
    frames.append(_unresolved_share_row(t, split))
    frames += _not_captured_rows(t, split)
    return _frame(frames)


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
        frame = credit_rows(
            run, t, gbar, kernels_by_module=kernels, session=session, feature_rows="summed"
        )
        return frame if by is None else _aggregate_samples(frame, by)

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
    keys = [L.STEP, L.FAMILY, L.PART, L.PARAM, L.SITE, L.FEATURE, L.QUANTITY, L.ORIGIN_STEP, *tag_cols]
    grouped = per_sample.groupby(keys, dropna=False, sort=False)[L.VALUE]
    summed = grouped.agg(["sum", "size"]).reset_index()
    summed = summed.rename(columns={"sum": L.VALUE, "size": L.COUNT})
    summed[L.COUNT] = summed[L.COUNT].astype("Int64")
    return pd.concat([frame[frame[L.SAMPLE].isna()], summed], ignore_index=True)
