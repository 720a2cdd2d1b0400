"""Tables the report shows: circuits to actions, credit by tag, credit by part of the optimizer.

Each function takes the ledger (or an artifact dict) and returns plain pandas / dataclass results;
an empty result means the rows are not there, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from chisel.attribution import ledger as L

PART_COLUMN = L.PART  # the leaf of the optimizer split a credit row belongs to
_NOT_FEATURES = L.NOT_FEATURES  # "<mean>" included: a weight's pathway, not a feature


def _rows(ledger: pd.DataFrame | None, family: str, quantity: str) -> pd.DataFrame:
    if ledger is None:
        return pd.DataFrame(columns=[*L.COLUMNS, L.SAMPLE])
    return ledger[(ledger[L.FAMILY] == family) & (ledger[L.QUANTITY] == quantity)]


# -- circuits ------------------------------------------------------------------------------------
def _is_action(target: str, actions: set[str]) -> bool:
    """Whether a circuit's output feature names an action: `a`, `a@site`, `x:a`, `action/a`."""
    candidates = {target, target.split("@")[0], target.split(":")[-1], target.split("/")[-1]}
    return bool(candidates & actions)


@dataclass(frozen=True)
class Circuits:
    """Circuit changes summed over steps, by feature pair "a→b"; `to_actions` tells the filter."""

    totals: pd.Series  # index "a→b", values Σ_t uᵀΔW_t d, sorted descending
    to_actions: bool

    def strengthened(self, k: int = 10) -> pd.Series:
        return self.totals[self.totals > 0].head(k)

    def weakened(self, k: int = 10) -> pd.Series:
        return self.totals[self.totals < 0].sort_values().head(k)


def circuits(ledger: pd.DataFrame | None, action_names: list[str] | None = None) -> Circuits:
    """Geometry "circuit" rows summed over steps; only feature → action pairs when any exist."""
    rows = _rows(ledger, L.GEOMETRY, L.CIRCUIT)
    rows = rows[rows[L.FEATURE].str.contains(L.ARROW, regex=False)]
    actions = set(action_names or [])
    to_actions = False
    if actions and len(rows):
        target = rows[L.FEATURE].str.split(L.ARROW, n=1).str[1]
        keep = target.map(lambda t: _is_action(t, actions))
        if keep.any():
            rows, to_actions = rows[keep], True
    totals = rows.groupby(L.FEATURE)[L.VALUE].sum().sort_values(ascending=False)
    return Circuits(totals.astype("float64"), to_actions)


# -- credit --------------------------------------------------------------------------------------
# Credit rows come in two forms: one row per sample (`sample` set, the sample's tags), or, with
# `chisel.attribute(..., credit_by=[...])`, per-sample rows summed within groups of those tags
# (`sample` null, the group's tag values set). Both count as "tagged" rows; untagged rows
# (weight decay, unresolved parts, summed feature rows) carry neither.
def tag_columns(rows: pd.DataFrame) -> list[str]:
    return [c for c in rows.columns if c.startswith(L.TAG_PREFIX)]


def sample_rows(ledger: pd.DataFrame | None, whole: bool = True) -> pd.DataFrame:
    """The tagged credit rows (per sample, or summed by `credit_by`): whole-sample rows
    (feature "") or, with whole=False, the rows of named features."""
    rows = _rows(ledger, L.CREDIT, L.ATTRIBUTION)
    tags = tag_columns(rows)
    tagged = rows[L.SAMPLE].notna()
    if tags:
        tagged = tagged | rows[tags].notna().any(axis=1)
    rows = rows[tagged]
    return rows[rows[L.FEATURE] == L.WHOLE] if whole else rows[~rows[L.FEATURE].isin(_NOT_FEATURES)]


def grouped_credit(rows: pd.DataFrame, key: pd.Series) -> pd.DataFrame:
    """Per group: samples, total and mean credit per sample.

    Per-sample rows count their distinct (origin step, sample). Rows summed by `credit_by`
    carry `count` (the samples summed into the row): the same samples appear again in every
    param's row and in later steps' momentum rows, so a credit_by group (its tag values) counts
    once per origin step (its largest count), summed over origin steps and over the credit_by
    groups that fall in the group. NaN where summed rows have no count.
    """
    ident = rows[L.SAMPLE].astype("float64")
    nan = pd.Series(np.nan, index=rows.index)
    origin = rows[L.ORIGIN_STEP].astype("float64") if L.ORIGIN_STEP in rows else nan
    ident = ident + 1e6 * origin.fillna(-1)
    summed = rows[L.SAMPLE].isna()
    count = rows[L.COUNT].astype("float64") if L.COUNT in rows else nan
    # the tag values identify a credit_by group: only summed rows need them (a row-wise join
    # over a per-sample ledger of millions of rows would dominate the report's time)
    tags = rows.loc[summed, tag_columns(rows)].astype("float64").fillna(np.inf).astype(str)
    labels = pd.Series("", index=rows.index, dtype=object)
    if tags.shape[1] and len(tags):
        labels[summed] = tags.agg("|".join, axis=1)
    frame = pd.DataFrame(
        {
            "group": key.values,
            "id": ident.where(~summed).values,
            "origin": origin.fillna(rows[L.STEP].astype("float64")).values,
            "tags": labels.values,
            "summed": summed.values,
            "uncounted": (summed & count.isna()).values,
            "count": count.where(summed).values,
            L.VALUE: rows[L.VALUE].values,
        }
    )
    out = frame.groupby("group", sort=False).agg(
        samples=("id", "nunique"), uncounted=("uncounted", "any"), total=(L.VALUE, "sum")
    )
    counted = frame[frame["summed"]].groupby(["group", "tags", "origin"], sort=False)["count"]
    counted = counted.max().groupby(level="group").sum()
    out["samples"] = out["samples"] + counted.reindex(out.index, fill_value=0.0)
    out["samples"] = out["samples"].astype("float64").where(~out.pop("uncounted"))
    out["per_sample"] = out["total"] / out["samples"].clip(lower=1)
    return out


MAX_TAG_VALUES = 12  # a tag with more distinct values is grouped by sign


def _tag_labels(tag: str, values: pd.Series) -> tuple[pd.Series, list[str]]:
    """Each row's group label, and the labels in display order: per value for whole numbers
    with at most MAX_TAG_VALUES distinct values, else per sign. Vectorised: a per-sample
    ledger has millions of rows."""
    present = values.dropna()
    unique = np.sort(present.unique())
    if len(unique) <= MAX_TAG_VALUES and bool((unique == np.round(unique)).all()):
        names = {v: f"{tag} = {v:.6g}" for v in unique}
        order = list(names.values())
        labels = values.map(names)
    else:
        names = {1.0: f"{tag} > 0", -1.0: f"{tag} < 0", 0.0: f"{tag} = 0"}
        order = list(names.values())
        labels = np.sign(values).map(names)
    return labels.fillna("untagged"), [*order, "untagged"]


def credit_by_tags(ledger: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    """Whole-sample credit summed per value (or sign) of each tag the rows carry (any run's
    tags), keyed by tag name; tags no row carries are left out."""
    rows = sample_rows(ledger)
    out = {}
    for column in tag_columns(rows):
        values = rows[column].astype("float64")
        if values.isna().all():
            continue
        labels, order = _tag_labels(column[len(L.TAG_PREFIX):], values)
        frame = grouped_credit(rows, labels)
        out[column[len(L.TAG_PREFIX):]] = frame.reindex([n for n in order if n in frame.index])
    return out


def credit_by_tag(ledger: pd.DataFrame | None, tag: str) -> pd.DataFrame:
    """`credit_by_tags` of one tag (an empty frame when no row carries it)."""
    return credit_by_tags(ledger).get(tag, pd.DataFrame(columns=["samples", "total", "per_sample"]))


def credit_parts(ledger: pd.DataFrame | None) -> pd.Series:
    """Credit per part of the optimizer split (weight decay, momentum, gradient, residual…):
    the whole rows (feature "") summed by the ledger's `part` column."""
    rows = _rows(ledger, L.CREDIT, L.ATTRIBUTION)
    if not len(rows):
        return pd.Series(dtype="float64")
    whole = rows[rows[L.FEATURE] == L.WHOLE]
    return whole.groupby(PART_COLUMN)[L.VALUE].sum()


def momentum_unresolved(ledger: pd.DataFrame | None) -> pd.Series:
    """Per credit step: the share of the update's momentum part left unresolved (from
    gradients beyond the momentum horizon); rows of several params are averaged. Empty when
    the ledger has no such rows."""
    rows = _rows(ledger, L.CREDIT, L.MOMENTUM_UNRESOLVED_SHARE)
    rows = rows[np.isfinite(rows[L.VALUE].astype("float64"))]
    if rows.empty:
        return pd.Series(dtype="float64")
    whole = rows[rows[L.PARAM] == ""]
    use = rows[~rows[L.STEP].isin(whole[L.STEP])]  # a step's "" row, if any, speaks for it
    return pd.concat([whole, use]).groupby(L.STEP)[L.VALUE].mean().astype("float64")
