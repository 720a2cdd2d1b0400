"""Coverage: how much of the metric's change Δm the named features carry, per step and cumulated.

From the integrated attribution rows of the ledger (family "integrated", quantity "attribution"):
each recorded param has a whole row (feature ""); these sum to Δm of the step. A Linear weight
with features at its input also has one row per feature, a "<mean>" row (centred split) and a
"<residual>" row, and its bias a "<bias>" row; together they equal the whole rows of those
params. The rest of Δm goes through params without features (e.g. the critic, unsplit layers).
Latents of a sparse dictionary ("sae<i>@<site>") are features too, counted apart.
So per step:  named features (+ dictionary latents) + <mean> + <bias> + <residual> + params without features = Σ whole
rows = Δm (up to the completeness error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from chisel.attribution import ledger as L

FEATURES = "features"
DICTIONARY = "dictionary"
UNSPLIT = "unsplit"
# latents of a sparse dictionary (the demo's SAE, chisel.demo.features) are named "sae<i>@<site>"
DICTIONARY_NAME = re.compile(r"^sae\d+@")
# the columns of a coverage table, in the order the report draws them, and their names
PARTS = {
    FEATURES: "named features",
    DICTIONARY: "dictionary latents (sae…)",
    L.MEAN: "<mean> (the change acting on the mean input)",
    L.BIAS: "<bias>",
    L.RESIDUAL: "<residual> (off the features' span)",
    L.SPAN: "<span>",
    UNSPLIT: "params without features",
}


def part_name(part: str) -> str:
    return PARTS.get(part, part)


@dataclass(frozen=True)
class Coverage:
    """per_step: index step; one column per part present (see PARTS) and "delta_metric"."""

    per_step: pd.DataFrame

    @property
    def parts(self) -> list[str]:
        return [c for c in self.per_step.columns if c != L.DELTA_METRIC]

    @property
    def features(self) -> list[str]:
        """The parts that are features: named ones and dictionary latents."""
        return [c for c in (FEATURES, DICTIONARY) if c in self.per_step]

    @property
    def totals(self) -> pd.Series:
        """Each part and Δm summed over the attributed steps."""
        return self.per_step.sum()

    @property
    def delta_metric(self) -> float:
        return float(self.totals[L.DELTA_METRIC])

    def share(self, part: str | None = None) -> float:
        """The part's share of Δm summed over the steps (NaN if Δm is 0); default all the
        features (named and dictionary)."""
        parts = self.features if part is None else [part]
        total = self.delta_metric
        return float(self.totals[parts].sum()) / total if total else float("nan")

    def step_shares(self) -> pd.DataFrame:
        """part_t / Δm_t per step (NaN where Δm_t = 0)."""
        delta = self.per_step[L.DELTA_METRIC].where(self.per_step[L.DELTA_METRIC] != 0)
        return self.per_step[self.parts].div(delta, axis=0)

    def step_mass(self) -> pd.DataFrame:
        """|part_t| / Σ_parts |part_t| per step: which parts move the metric at that step,
        bounded where a share of a Δm_t near 0 is not (0 where every part is 0)."""
        mass = self.per_step[self.parts].abs()
        total = mass.sum(axis=1)
        return mass.div(total.where(total > 0), axis=0).fillna(0.0)

    def cumulative_shares(self) -> pd.DataFrame:
        """Σ_{s≤t} part_s / Σ_{s≤t} Δm_s: the share carried so far at each step."""
        cum = self.per_step.cumsum()
        delta = cum[L.DELTA_METRIC].where(cum[L.DELTA_METRIC] != 0)
        return cum[self.parts].div(delta, axis=0)


def coverage(ledger: pd.DataFrame | None) -> Coverage | None:
    """The coverage of the integrated attribution rows, or None when the ledger has none."""
    if ledger is None:
        return None
    integrated = ledger[ledger[L.FAMILY] == L.INTEGRATED]
    rows = integrated[integrated[L.QUANTITY] == L.ATTRIBUTION]
    if rows.empty:
        return None
    whole = rows[rows[L.FEATURE] == L.WHOLE]
    split = rows[rows[L.FEATURE] != L.WHOLE]
    delta = integrated[
        (integrated[L.QUANTITY] == L.DELTA_METRIC) & (integrated[L.FEATURE] == L.WHOLE)
    ]
    steps = sorted(set(rows[L.STEP]) | set(delta[L.STEP]))
    kind = split[L.FEATURE].map(lambda f: DICTIONARY if DICTIONARY_NAME.match(f) else FEATURES)
    part = split[L.FEATURE].where(split[L.FEATURE].isin(L.NOT_FEATURES), kind)
    by_part = split.assign(part=part).groupby([L.STEP, "part"])[L.VALUE].sum()
    table = (
        by_part.unstack("part").reindex(index=steps) if len(split) else pd.DataFrame(index=steps)
    )
    split_params = set(zip(split[L.STEP], split[L.PARAM]))
    unsplit = [(t, p) not in split_params for t, p in zip(whole[L.STEP], whole[L.PARAM])]
    table[UNSPLIT] = whole[unsplit].groupby(L.STEP)[L.VALUE].sum()
    # Δm of each step; where a step has no delta_metric row, the sum of its whole rows
    whole_sum = whole.groupby(L.STEP)[L.VALUE].sum().reindex(steps)
    table[L.DELTA_METRIC] = delta.groupby(L.STEP)[L.VALUE].sum().reindex(steps).fillna(whole_sum)
    table = table.fillna(0.0)
    if FEATURES not in table:
        table[FEATURES] = 0.0
    columns = [
        c for c in PARTS if c in table and (c in (FEATURES, DICTIONARY, UNSPLIT) or table[c].any())
    ]
    # a label this module does not know keeps its own part, so the parts still sum to Δm
    columns += [c for c in table.columns if c not in PARTS and c != L.DELTA_METRIC]
    table.columns.name = None
    table.index.name = L.STEP
    return Coverage(table[[*columns, L.DELTA_METRIC]].astype("float64"))
