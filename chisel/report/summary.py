"""The numbers of the report: chiseled pathways, group shares, the blue-wall correlate, completeness.

A feature's total is its integrated attribution summed over the attributed steps (the last row of
`chisel.timeline(ledger)`): its share of m(θ_end) − m(θ_start) for the demo's metric, the
log-probability of the chosen actions. Group shares divide group sums by the sum over all
features (signed), and the sums of |total| likewise (`abs_share`), so a large signed share built
from cancelling features is visible.

The headline ranks pathways by their Shapley importance (validation.parquet: the value of each
pathway's learned change in the final network, what the agent now relies on) when the run has
it, and by the training-path attribution otherwise (`Summary.headline_by` says which). "<mean>"
and the other labels of `L.NOT_FEATURES` are never ranked as features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from chisel.attribution import ledger as L
from chisel.attribution.timeline import timeline
from chisel.report import tables as T
from chisel.report import validation as V
from chisel.report.artifacts import VALIDATION_FILE, RunArtifacts
from chisel.report.coverage import Coverage, coverage

OTHER = "other"  # features whose concept is in no group of demo.json
SPURIOUS = "spurious"
TOP_K = 8
# the headline rankings the summary can use
BY_SHAPLEY = "Shapley importance"
BY_ATTRIBUTION = "training-path attribution"


@dataclass(frozen=True)
class FeatureTotal:
    name: str
    concept: str | None
    group: str
    total: float
    rank: int  # 1 = largest |total|


@dataclass(frozen=True)
class GroupShare:
    group: str
    concepts: list[str]
    features: int
    total: float  # Σ_f∈group A_f
    share: float  # total / Σ_f A_f
    abs_total: float  # Σ_f∈group |A_f|
    abs_share: float  # abs_total / Σ_f |A_f|


@dataclass(frozen=True)
class Correlate:
    """The spurious correlate (blue wall): how much of the reinforcement went through it."""

    concepts: list[str]
    features: list[str]
    total: float
    share: float
    abs_share: float
    best_rank: int | None
    n_features: int
    even_share: float  # the abs share it would have if every feature got the same |A|

    @property
    def chiseled(self) -> bool:
        """More than its even share of Σ|attribution| (what it would get if all were equal)."""
        return self.best_rank is not None and self.abs_share > self.even_share


@dataclass
class Summary:
    run: str
    features: list[FeatureTotal] = field(default_factory=list)
    groups: list[GroupShare] = field(default_factory=list)
    correlate: Correlate | None = None
    feature_sum: float = 0.0
    residual: float = 0.0  # off-span and bias shares of the layers that were split
    delta_metric: float = 0.0  # Σ_t m(θ_{t+1}) − m(θ_t) over attributed steps
    completeness_max: float | None = None
    completeness_step: int | None = None
    returns: dict[str, float] = field(default_factory=dict)
    causal_baseline: float | None = None
    causal: list[T.CausalRow] = field(default_factory=list)
    mean: float = 0.0  # the "<mean>" shares (centred split)
    coverage: Coverage | None = None
    validation: V.Validation | None = None
    # the headline: pathways by |Shapley| when validation has it, else by |attribution|
    headline_by: str = BY_ATTRIBUTION
    headline_why: str = ""  # why the attribution ranking is the headline, when it is
    relied_on: list[tuple[str, float]] = field(default_factory=list)  # (pathway, Shapley)

    def top(self, k: int = TOP_K) -> list[FeatureTotal]:
        return self.features[:k]


def concept_of(feature: str, demo: dict[str, Any] | None) -> str | None:
    """The concept a feature names: demo.json "feature_concepts", else "<concept>@<site>"."""
    demo = demo or {}
    mapping = demo.get("feature_concepts") or {}
    if feature in mapping:
        return str(mapping[feature])
    known = {c for cs in (demo.get("concepts") or {}).values() for c in cs}
    head = feature.split("@")[0]
    return head if head in known else None


def group_of(concept: str | None, demo: dict[str, Any] | None) -> str:
    for group, concepts in ((demo or {}).get("concepts") or {}).items():
        if concept is not None and concept in concepts:
            return str(group)
    return OTHER


def feature_timeline(ledger: pd.DataFrame | None) -> pd.DataFrame:
    """`chisel.timeline` of the named features only: "<mean>" and the other labels of
    L.NOT_FEATURES are pathways of a weight, not features, and are never ranked as features."""
    if ledger is None:
        return pd.DataFrame()
    tl = timeline(ledger)
    return tl[[c for c in tl.columns if c not in L.NOT_FEATURES]]


def feature_totals(ledger: pd.DataFrame | None, demo: dict[str, Any] | None) -> list[FeatureTotal]:
    """Every feature's integrated attribution summed over steps, ranked by |total|."""
    tl = feature_timeline(ledger)
    if tl.empty or not tl.shape[1]:
        return []
    final = tl.iloc[-1]
    order = final.abs().sort_values(ascending=False, kind="stable").index
    out = []
    for rank, name in enumerate(order, start=1):
        concept = concept_of(name, demo)
        out.append(FeatureTotal(name, concept, group_of(concept, demo), float(final[name]), rank))
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def group_shares(features: list[FeatureTotal], demo: dict[str, Any] | None) -> list[GroupShare]:
    groups = {
        str(g): [str(c) for c in cs] for g, cs in ((demo or {}).get("concepts") or {}).items()
    }
    if any(f.group == OTHER for f in features):
        groups[OTHER] = []
    total = sum(f.total for f in features)
    abs_total = sum(abs(f.total) for f in features)
    out = []
    for group, concepts in groups.items():
        members = [f for f in features if f.group == group]
        s = sum(f.total for f in members)
        a = sum(abs(f.total) for f in members)
        out.append(
            GroupShare(group, concepts, len(members), s, _ratio(s, total), a, _ratio(a, abs_total))
        )
    return out


def correlate(features: list[FeatureTotal], demo: dict[str, Any] | None) -> Correlate | None:
    """The features of the "spurious" group (concept wall_blue when there is no such group);
    None for a run that is not a demo run (no demo.json: no concept is known to be spurious)."""
    if demo is None:
        return None
    concepts = list(((demo or {}).get("concepts") or {}).get(SPURIOUS, [])) or ["wall_blue"]
    members = [f for f in features if f.concept in concepts]
    if not features:
        return None
    total = sum(f.total for f in features)
    abs_total = sum(abs(f.total) for f in features)
    s = sum(f.total for f in members)
    a = sum(abs(f.total) for f in members)
    return Correlate(
        concepts=concepts,
        features=[f.name for f in members],
        total=s,
        share=_ratio(s, total),
        abs_share=_ratio(a, abs_total),
        best_rank=min((f.rank for f in members), default=None),
        n_features=len(features),
        even_share=len(members) / len(features),
    )


def _scalar_rows(ledger: pd.DataFrame | None, quantity: str) -> pd.DataFrame:
    if ledger is None:
        return pd.DataFrame(columns=[L.STEP, L.VALUE])
    rows = ledger[
        (ledger[L.FAMILY] == L.INTEGRATED)
        & (ledger[L.QUANTITY] == quantity)
        & (ledger[L.FEATURE] == L.WHOLE)
    ]
    return rows.groupby(L.STEP, as_index=False)[L.VALUE].sum()


def completeness(ledger: pd.DataFrame | None) -> pd.DataFrame:
    """Per attributed step: |Σ A − Δm| / max(|Δm|, |Σ A|) of the integrated family."""
    return _scalar_rows(ledger, L.COMPLETENESS_REL)


def _labelled(ledger: pd.DataFrame | None, labels: list[str]) -> float:
    """Σ of the integrated attribution rows with these feature labels."""
    if ledger is None:
        return 0.0
    rows = ledger[
        (ledger[L.FAMILY] == L.INTEGRATED)
        & (ledger[L.QUANTITY] == L.ATTRIBUTION)
        & ledger[L.FEATURE].isin(labels)
    ]
    return float(rows[L.VALUE].sum())


def _headline(s: Summary, art: RunArtifacts) -> None:
    """Rank the headline pathways by Shapley importance where validation has it."""
    v = s.validation
    if v is not None and v.has(V.SHAPLEY):
        s.headline_by = BY_SHAPLEY
        rows = v.ranked(v.features)
        rows = rows[np.isfinite(rows[V.SHAPLEY])]
        s.relied_on = [(str(n), float(x)) for n, x in zip(rows[V.LABEL], rows[V.SHAPLEY])]
        return
    s.headline_by = BY_ATTRIBUTION
    if v is None or v.table.empty:
        why = art.why_missing(VALIDATION_FILE) or f"{VALIDATION_FILE} has no rows"
        s.headline_why = f"no validation by intervention: {why}"
    else:
        s.headline_why = f"{VALIDATION_FILE} has no Shapley values"


def shapley_rank(s: Summary, names: list[str]) -> int | None:
    """The best rank (1 = largest |Shapley|) among the feature pathways of these features."""
    if s.validation is None or not s.relied_on:
        return None
    features = s.validation.features
    labels = set(features.loc[features[V.FEATURE].isin(names), V.LABEL])
    return next((i for i, (n, _) in enumerate(s.relied_on, 1) if n in labels), None)


def summarize(art: RunArtifacts) -> Summary:
    """Every number of the report, from the artifacts that exist."""
    features = feature_totals(art.ledger, art.demo)
    comp = completeness(art.ledger)
    s = Summary(run=str(art.root), features=features)
    s.groups = group_shares(features, art.demo)
    s.correlate = correlate(features, art.demo)
    s.feature_sum = float(sum(f.total for f in features))
    s.residual = _labelled(art.ledger, [L.RESIDUAL, L.BIAS])
    s.mean = _labelled(art.ledger, [L.MEAN])
    s.coverage = coverage(art.ledger)
    s.validation = V.load(art.validation, art.validation_summary)
    _headline(s, art)
    s.delta_metric = float(_scalar_rows(art.ledger, L.DELTA_METRIC)[L.VALUE].sum())
    if len(comp):
        i = int(np.argmax(comp[L.VALUE].to_numpy()))
        s.completeness_max = float(comp[L.VALUE].iloc[i])
        s.completeness_step = int(comp[L.STEP].iloc[i])
    returns = (art.demo or {}).get("returns") or {}
    s.returns = {str(k): float(v) for k, v in returns.items() if isinstance(v, int | float)}
    s.causal_baseline, s.causal = T.causal_rows(art.causal)
    return s
