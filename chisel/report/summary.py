"""The numbers of any run's report: chiseled pathways, coverage, the headline, completeness.

A feature's total is its integrated attribution summed over the attributed steps (the last row of
`chisel.timeline(ledger)`): its share of m(θ_end) − m(θ_start) for the run's metric. A scenario's
own numbers (the demo's concept groups and causal check) are computed by its own sections
(`chisel.demo.report_numbers`).

The headline ranks pathways by their Shapley importance (validation.parquet: the value of each
pathway's learned change in the final network, what the agent now relies on) when the run has
it, and by the training-path attribution otherwise (`Summary.headline_by` says which). "<mean>"
and the other labels of `L.NOT_FEATURES` are never ranked as features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from chisel.attribution import ledger as L
from chisel.attribution.timeline import timeline
from chisel.report import validation as V
from chisel.report.artifacts import VALIDATION_FILE, RunArtifacts
from chisel.report.coverage import Coverage, coverage

TOP_K = 8
# the headline rankings the summary can use
BY_SHAPLEY = "Shapley importance"
BY_ATTRIBUTION = "training-path attribution"


@dataclass(frozen=True)
class FeatureTotal:
    name: str
    total: float
    rank: int  # 1 = largest |total|


@dataclass
class Summary:
    run: str
    features: list[FeatureTotal] = field(default_factory=list)
    feature_sum: float = 0.0
    residual: float = 0.0  # off-span and bias shares of the layers that were split
    delta_metric: float = 0.0  # Σ_t m(θ_{t+1}) − m(θ_t) over attributed steps
    completeness_max: float | None = None
    completeness_step: int | None = None
    mean: float = 0.0  # the "<mean>" shares (centred split)
    coverage: Coverage | None = None
    validation: V.Validation | None = None
    # the headline: pathways by |Shapley| when validation has it, else by |attribution|
    headline_by: str = BY_ATTRIBUTION
    headline_why: str = ""  # why the attribution ranking is the headline, when it is
    relied_on: list[tuple[str, float]] = field(default_factory=list)  # (pathway, Shapley)

    def top(self, k: int = TOP_K) -> list[FeatureTotal]:
        return self.features[:k]


def feature_timeline(ledger: pd.DataFrame | None) -> pd.DataFrame:
    """`chisel.timeline` of the named features only: "<mean>" and the other labels of
    L.NOT_FEATURES are pathways of a weight, not features, and are never ranked as features."""
    if ledger is None:
        return pd.DataFrame()
    tl = timeline(ledger)
    return tl[[c for c in tl.columns if c not in L.NOT_FEATURES]]


def feature_totals(ledger: pd.DataFrame | None) -> list[FeatureTotal]:
    """Every feature's integrated attribution summed over steps, ranked by |total|."""
    tl = feature_timeline(ledger)
    if tl.empty or not tl.shape[1]:
        return []
    final = tl.iloc[-1]
    order = final.abs().sort_values(ascending=False, kind="stable").index
    return [FeatureTotal(name, float(final[name]), rank) for rank, name in enumerate(order, 1)]


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
    features = feature_totals(art.ledger)
    comp = completeness(art.ledger)
    s = Summary(run=str(art.root), features=features)
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
    return s
