"""The TrashWorld demo's own numbers in its report: concept-group shares, the blue-wall correlate,
the returns and the causal check (demo.json, causal.json).

Group shares divide group sums by the sum over all features (signed), and the sums of |total|
likewise (`abs_share`), so a large signed share built from cancelling features is visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chisel.report.artifacts import RunArtifacts
from chisel.report.summary import FeatureTotal, Summary

OTHER = "other"  # features whose concept is in no group of demo.json
SPURIOUS = "spurious"
WALL_BLUE = "wall_blue"  # the spurious concept when demo.json names no "spurious" group


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


@dataclass(frozen=True)
class CausalRow:
    name: str
    features: list[str]
    ret: float
    drop: float  # baseline − return
    drop_rel: float  # drop / |baseline|
    std: float | None
    seeds: int | None


@dataclass
class DemoNumbers:
    """The demo's numbers of one run (beside the generic `Summary`)."""

    groups: list[GroupShare] = field(default_factory=list)
    correlate: Correlate | None = None
    returns: dict[str, float] = field(default_factory=dict)
    causal_baseline: float | None = None
    causal: list[CausalRow] = field(default_factory=list)


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


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def group_shares(features: list[FeatureTotal], demo: dict[str, Any] | None) -> list[GroupShare]:
    groups = {
        str(g): [str(c) for c in cs] for g, cs in ((demo or {}).get("concepts") or {}).items()
    }
    of = {f.name: group_of(concept_of(f.name, demo), demo) for f in features}
    if OTHER in of.values():
        groups[OTHER] = []
    total = sum(f.total for f in features)
    abs_total = sum(abs(f.total) for f in features)
    out = []
    for group, concepts in groups.items():
        members = [f for f in features if of[f.name] == group]
        s = sum(f.total for f in members)
        a = sum(abs(f.total) for f in members)
        out.append(
            GroupShare(group, concepts, len(members), s, _ratio(s, total), a, _ratio(a, abs_total))
        )
    return out


def correlate(features: list[FeatureTotal], demo: dict[str, Any] | None) -> Correlate | None:
    """The features of the "spurious" group (concept wall_blue when there is no such group);
    None without demo.json or without features."""
    if demo is None or not features:
        return None
    concepts = list((demo.get("concepts") or {}).get(SPURIOUS, [])) or [WALL_BLUE]
    members = [f for f in features if concept_of(f.name, demo) in concepts]
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


def causal_rows(causal: dict[str, Any] | None) -> tuple[float | None, list[CausalRow]]:
    """Baseline return and one row per condition (top-k, bottom-k, random-k) of causal.json."""
    if not causal or "baseline" not in causal:
        return None, []
    base = float(causal["baseline"])
    out = []
    for cond in causal.get("conditions", []):
        ret = float(cond.get("return", np.nan))
        drop = base - ret
        out.append(
            CausalRow(
                name=str(cond.get("name", "?")),
                features=[str(f) for f in cond.get("features", [])],
                ret=ret,
                drop=drop,
                drop_rel=drop / abs(base) if base else float("nan"),
                std=float(cond["std"]) if cond.get("std") is not None else None,
                seeds=int(cond["seeds"]) if cond.get("seeds") is not None else None,
            )
        )
    return base, out


def demo_numbers(art: RunArtifacts, s: Summary) -> DemoNumbers:
    """The demo's numbers of a run, from its summary's feature totals and demo/causal.json."""
    n = DemoNumbers()
    n.groups = group_shares(s.features, art.demo)
    n.correlate = correlate(s.features, art.demo)
    returns = (art.demo or {}).get("returns") or {}
    n.returns = {str(k): float(v) for k, v in returns.items() if isinstance(v, int | float)}
    n.causal_baseline, n.causal = causal_rows(art.causal)
    return n
