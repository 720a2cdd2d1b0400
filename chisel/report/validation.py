"""The numbers of "Does the attribution hold?": validation.parquet and validation.json as read.

validation.parquet has one row per pathway: a named feature read by a weight (kind "feature"),
a weight's "<mean>", "<residual>" or "<bias>" pathway, or a group of pathways (kind "group"),
with the training-path attribution beside measures by intervention on the final network:

- `shapley` (± `shapley_se`): the Shapley value of the pathway's learned change in the game
  "revert a coalition of pathways, measure the metric" — what the agent now relies on; the
  values of all pathways sum exactly to m(final) − m(all reverted);
- `removal`: m(final) − m(final with this pathway's learned change reverted);
- `ablation_metric`, `ablation_return`: the effect of projecting the feature out of its site
  (mean kept) on the metric and on the return (NaN where not measured).

Any column and any key of validation.json may be missing; the report shows what exists.
Rank agreements and the over/under-stated features use the feature pathways only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from chisel.attribution import ledger as L
from chisel.report.artifacts import VALIDATION_FILE
from chisel.validation.agreement import spearman  # one ρ for the stage and its report

PATHWAY, FEATURE, SITE, PARAM, CONCEPT, KIND = (
    "pathway",
    "feature",
    "site",
    "param",
    "concept",
    "kind",
)
ATTRIBUTION, SHAPLEY, SHAPLEY_SE, REMOVAL = "attribution", "shapley", "shapley_se", "removal"
ABLATION_METRIC, ABLATION_RETURN = "ablation_metric", "ablation_return"
LABEL = "label"  # the feature's name, with "→ param" where a feature has several pathways
KIND_FEATURE, KIND_GROUP = "feature", "group"
TEXT_COLUMNS = (PATHWAY, FEATURE, SITE, PARAM, CONCEPT, KIND)
VALUE_COLUMNS = (ATTRIBUTION, SHAPLEY, SHAPLEY_SE, REMOVAL, ABLATION_METRIC, ABLATION_RETURN)

# what is compared with what: validation.json's spearman keys are "<predictor>_vs_<effect>"
PREDICTORS = {ATTRIBUTION: "training-path attribution", SHAPLEY: "Shapley importance"}
EFFECTS = {
    REMOVAL: "pathway removal (metric)",
    ABLATION_METRIC: "feature ablation (metric)",
    ABLATION_RETURN: "feature ablation (return)",
}
SHORT = {
    REMOVAL: "removal",
    ABLATION_METRIC: "ablation (metric)",
    ABLATION_RETURN: "ablation (return)",
}
# the pairs shown, in order: each predictor against each effect, and the two predictors
PAIRS = [*((x, y) for x in PREDICTORS for y in EFFECTS), (ATTRIBUTION, SHAPLEY)]
# as chisel.validation.agreement: importance against removal (or the other importance) signed,
# |importance| against the signed ablation effect (a pathway whose change lowered the metric a
# lot is still one the computation runs through)
SIGNED, ABS = "signed", "abs"
SPEARMAN_KEY = "spearman"


def normalize(frame: pd.DataFrame) -> pd.DataFrame:
    """Every column of the schema present (text "" and values NaN where the file has none);
    `kind` inferred from the feature label where the file has no kind; `label` added."""
    out = frame.copy()
    for column in TEXT_COLUMNS:
        if column not in out:
            out[column] = pd.NA
    for column in VALUE_COLUMNS:
        out[column] = (
            pd.to_numeric(out[column], errors="coerce").astype("float64")
            if column in out
            else np.nan
        )
    inferred = out[FEATURE].map(
        lambda f: str(f) if f in L.NOT_FEATURES and f != L.WHOLE else KIND_FEATURE
    )
    out[KIND] = out[KIND].where(out[KIND].notna(), inferred)
    for column in TEXT_COLUMNS:
        out[column] = out[column].fillna("").astype(str)
    out[PATHWAY] = out[PATHWAY].where(out[PATHWAY] != "", out[FEATURE] + " → " + out[PARAM])
    repeated = out[FEATURE].duplicated(keep=False) & (out[PARAM] != "")
    label = out[FEATURE].where(~repeated, out[FEATURE] + " → " + out[PARAM])
    out[LABEL] = label.where(out[FEATURE] != "", out[PATHWAY])  # groups: their pathway id
    return out.reset_index(drop=True)


@dataclass(frozen=True)
class Agreement:
    """Spearman ρ between a predictor (attribution, Shapley) and a measured effect."""

    predictor: str
    effect: str
    rho: float
    n: int | None
    source: str  # "validation.json" or "validation.parquet" (computed by the report)
    transform: str = SIGNED  # "abs": |predictor| against the effect

    @property
    def predictor_name(self) -> str:
        name = PREDICTORS[self.predictor]
        return f"|{name}|" if self.transform == ABS else name

    @property
    def effect_name(self) -> str:
        return EFFECTS.get(self.effect) or PREDICTORS[self.effect]


@dataclass(frozen=True)
class RankGap:
    """A feature ranked far apart by |predictor| and by |effect| (1 = largest, of n)."""

    label: str
    rank_predictor: int
    rank_effect: int
    n: int


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def default_transform(effect: str) -> str:
    return ABS if effect.startswith("ablation_") else SIGNED


def agreements(
    table: pd.DataFrame, summary: dict[str, Any] | None, source_file: str
) -> list[Agreement]:
    """Each pair of PAIRS the artifacts have: ρ and n from validation.json where it holds the
    pair, else computed over the feature pathways of the table (≥ 3 finite pairs)."""
    given = (summary or {}).get(SPEARMAN_KEY)
    given = given if isinstance(given, dict) else {}
    features = table[table[KIND] == KIND_FEATURE]
    out = []
    for x, y in PAIRS:
        entry = given.get(f"{x}_vs_{y}")
        if isinstance(entry, dict):
            n = entry.get("n")
            n = int(n) if isinstance(n, int | float) and math.isfinite(n) else None
            how = entry.get("transform")
            how = how if how in (SIGNED, ABS) else default_transform(y)
            out.append(Agreement(x, y, _number(entry.get("rho")), n, "validation.json", how))
            continue
        how = default_transform(y)
        xs = features[x].abs() if how == ABS else features[x]
        rho, n = spearman(xs, features[y])
        if n >= 3:
            out.append(Agreement(x, y, rho, n, source_file, how))
    return out


def _abs_rank(values: pd.Series) -> pd.Series:
    return values.abs().rank(ascending=False, method="min").astype(int)


def misranked(
    table: pd.DataFrame, effect: str, predictor: str = ATTRIBUTION
) -> tuple[list[RankGap], list[RankGap], int]:
    """The features the predictor over-states (top third by |predictor|, bottom half by
    |effect|) and under-states (the reverse), largest rank gap first; and n compared."""
    rows = table[table[KIND] == KIND_FEATURE]
    rows = rows[np.isfinite(rows[predictor]) & np.isfinite(rows[effect])]
    n = len(rows)
    if n < 3:
        return [], [], n
    rp, re_ = _abs_rank(rows[predictor]), _abs_rank(rows[effect])
    top, bottom = math.ceil(n / 3), n / 2
    gaps = [RankGap(label, int(a), int(b), n) for label, a, b in zip(rows[LABEL], rp, re_)]
    over = [g for g in gaps if g.rank_predictor <= top and g.rank_effect > bottom]
    under = [g for g in gaps if g.rank_effect <= top and g.rank_predictor > bottom]
    over.sort(key=lambda g: g.rank_predictor - g.rank_effect)
    under.sort(key=lambda g: g.rank_effect - g.rank_predictor)
    return over, under, n


@dataclass
class Validation:
    """validation.parquet (normalized) and validation.json of one run."""

    table: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    agreements: list[Agreement] = field(default_factory=list)

    @property
    def features(self) -> pd.DataFrame:
        """The feature pathways ("<mean>", "<residual>", "<bias>" and groups are not features)."""
        return self.table[self.table[KIND] == KIND_FEATURE]

    @property
    def groups(self) -> pd.DataFrame:
        return self.table[self.table[KIND] == KIND_GROUP]

    @property
    def pathways(self) -> pd.DataFrame:
        """Every row that is not a group: features and the weights' other pathways."""
        return self.table[self.table[KIND] != KIND_GROUP]

    def has(self, column: str) -> bool:
        return bool(np.isfinite(self.table[column]).any())

    def number(self, key: str) -> float | None:
        value = _number(self.summary.get(key))
        return value if math.isfinite(value) else None

    @property
    def ranking(self) -> str:
        """The column the table is ranked by: Shapley, else removal, else attribution."""
        return next((c for c in (SHAPLEY, REMOVAL, ATTRIBUTION) if self.has(c)), ATTRIBUTION)

    def ranked(self, rows: pd.DataFrame | None = None) -> pd.DataFrame:
        """Rows by |ranking column| descending (rows without it last)."""
        rows = self.pathways if rows is None else rows
        key = rows[self.ranking].abs().fillna(-1.0)
        return rows.loc[key.sort_values(ascending=False, kind="stable").index]

    def shapley_by_kind(self) -> pd.Series:
        """Σ Shapley of the pathways of each kind ("feature", "<mean>", "<residual>", "<bias>"),
        features first."""
        rows = self.pathways[np.isfinite(self.pathways[SHAPLEY])]
        sums = rows.groupby(KIND, sort=False)[SHAPLEY].sum()
        order = [KIND_FEATURE, *sorted(k for k in sums.index if k != KIND_FEATURE)]
        return sums.reindex([k for k in order if k in sums.index])

    def agreement(self, predictor: str, effect: str) -> Agreement | None:
        return next(
            (a for a in self.agreements if a.predictor == predictor and a.effect == effect), None
        )


def load(table: pd.DataFrame | None, summary: dict[str, Any] | None) -> Validation | None:
    """The validation of a run (either file may be missing), or None when neither has rows."""
    if (table is None or table.empty) and not summary:
        return None
    frame = table if table is not None else pd.DataFrame(columns=[FEATURE])
    norm = normalize(frame)
    return Validation(norm, dict(summary or {}), agreements(norm, summary, VALIDATION_FILE))
