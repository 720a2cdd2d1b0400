"""Hold the ledger's training-path attribution against the interventions, and rank-correlate.

`validation_table` joins, per pathway, the cumulative integrated attribution (the sum over the
ledger's steps of the rows family "integrated", quantity "attribution", matched by (param,
feature); `<mean>`, `<residual>` and `<bias>` rows too) with the removal effect, the Shapley
value and the ablation effects. `agreement` gives Spearman's ρ between them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from chisel.attribution import ledger as L
from chisel.validation import _common as C

KEYS = [C.PATHWAY, C.FEATURE, C.SITE, C.PARAM, C.CONCEPT, C.KIND]


def cumulative_attribution(ledger: pd.DataFrame) -> pd.Series:
    """Σ over steps of the integrated input-side attribution rows, indexed by (param, feature)."""
    rows = ledger[
        (ledger[L.FAMILY] == L.INTEGRATED)
        & (ledger[L.QUANTITY] == L.ATTRIBUTION)
        & (ledger[L.FEATURE] != L.WHOLE)
    ]
    return rows.groupby([L.PARAM, L.FEATURE])[L.VALUE].sum()


def validation_table(
    ledger: pd.DataFrame,
    pathways: pd.DataFrame,
    shapley: pd.DataFrame | None = None,
    ablation: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per pathway (groups left out): attribution, removal, shapley, ablation columns.

    Args:
        ledger: rows of `chisel.attribute` (any steps; whatever integrated rows exist are summed).
        pathways: `chisel.pathway_effects`; its effect becomes the `removal` column.
        shapley: `chisel.pathway_shapley` (adds `shapley`, `shapley_se`).
        ablation: `chisel.ablation_effects`; each score becomes a column `ablation_<score>`,
            given to every pathway of that feature (a feature read by two weights appears in
            both rows); NaN for `<mean>` / `<residual>` / `<bias>`.

    Returns:
        pathway, feature, site, param, concept, kind, attribution (NaN where the ledger has no
        row for the pathway, e.g. `<mean>` in an uncentred ledger), removal, [shapley,
        shapley_se], [ablation_<score>…].
    """
    table = pathways[pathways[C.KIND] != C.KIND_GROUP][KEYS].copy()
    table[C.REMOVAL] = pathways.loc[table.index, C.EFFECT]
    totals = cumulative_attribution(ledger)
    keys = list(zip(table[C.PARAM], table[C.FEATURE], strict=True))
    table[C.ATTRIBUTION] = [totals.get(k, np.nan) for k in keys]
    if shapley is not None:
        by_id = shapley.set_index(C.PATHWAY)
        table[C.SHAPLEY] = table[C.PATHWAY].map(by_id[C.SHAPLEY])
        table[C.SHAPLEY_SE] = table[C.PATHWAY].map(by_id[C.SHAPLEY_SE])
    if ablation is not None:
        for score, rows in ablation.groupby(C.SCORE, sort=False):
            effects = rows.set_index(C.FEATURE)[C.EFFECT]
            column = table[C.FEATURE].map(effects)
            table[C.ABLATION_PREFIX + str(score)] = column.where(table[C.KIND] == C.KIND_FEATURE)
    order = [*KEYS, C.ATTRIBUTION, C.REMOVAL]
    return table[order + [c for c in table.columns if c not in order]].reset_index(drop=True)


def spearman(x: pd.Series | np.ndarray, y: pd.Series | np.ndarray) -> tuple[float, int]:
    """Spearman's ρ (Pearson on average ranks, ties shared) over the pairs where both are
    finite, and how many pairs that is; ρ is NaN with fewer than 3 pairs or a constant side."""
    frame = pd.DataFrame({"x": np.asarray(x, float), "y": np.asarray(y, float)})
    frame = frame[np.isfinite(frame.x) & np.isfinite(frame.y)]
    n = len(frame)
    if n < 3:
        return float("nan"), n
    rx, ry = frame.x.rank(method="average").to_numpy(), frame.y.rank(method="average").to_numpy()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx**2).sum() * (ry**2).sum()))
    return (float((rx * ry).sum() / denom) if denom > 0 else float("nan")), n


def agreement(table: pd.DataFrame, *, kinds: tuple[str, ...] = (C.KIND_FEATURE,)) -> pd.DataFrame:
    """Spearman ρ between the importances and the interventions of a `validation_table`.

    Pairs (each when both columns are present), over the rows whose kind is in `kinds`
    (default: the named feature pathways):
      - attribution ~ removal, shapley ~ removal, attribution ~ shapley: **signed** (both
        sides say how much the pathway's change adds to the metric, with its sign);
      - |attribution| ~ ablation_<score>, |shapley| ~ ablation_<score>: importance in
        **absolute value** against the signed ablation effect (the drop of the score when the
        feature is projected out): a pathway whose change lowered the metric a lot is still
        one the network's computation runs through, while ablation says only how much the
        score relies on the feature.

    Returns:
        One row per pair: x, y, transform ("signed" | "abs"), rho, n.
    """
    rows = table[table[C.KIND].isin(kinds)]
    pairs = [(C.ATTRIBUTION, C.REMOVAL, "signed"), (C.SHAPLEY, C.REMOVAL, "signed"),
             (C.ATTRIBUTION, C.SHAPLEY, "signed")]
    for column in [c for c in table.columns if c.startswith(C.ABLATION_PREFIX)]:
        pairs += [(C.ATTRIBUTION, column, "abs"), (C.SHAPLEY, column, "abs")]
    out = []
    for x, y, how in pairs:
        if x not in rows or y not in rows:
            continue
        xs = rows[x].abs() if how == "abs" else rows[x]
        rho, n = spearman(xs, rows[y])
        out.append({"x": x, "y": y, "transform": how, "rho": rho, "n": n})
    return pd.DataFrame(out, columns=["x", "y", "transform", "rho", "n"])
