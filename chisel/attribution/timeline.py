"""The chisel timeline: cumulative reinforcement per feature pathway over training steps."""

from __future__ import annotations

import pandas as pd

from chisel.attribution import ledger as L


def timeline(
    ledger: pd.DataFrame,
    *,
    family: str = L.INTEGRATED,
    quantity: str | None = None,
    by: str = "feature",
    cumulative: bool = True,
    include_residual: bool = False,
) -> pd.DataFrame:
    """Per step (index) and pathway (columns): the reinforcement each pathway received.

    Args:
        ledger: rows of `chisel.attribute`.
        family: "integrated" (shares of Δm through each feature, default), "geometry" (with
            quantity "circuit": feature→action connection changes) or "credit".
        quantity: defaults to "attribution" ("circuit" for geometry).
        by: "feature" sums each feature over the weights that read it; "pathway" keeps
            `feature @ param` apart.
        cumulative: running sums over steps (the timeline) or per-step values.
        include_residual: keep the off-span residual, mean-input and bias shares as pathways.
    """
    quantity = quantity or (L.CIRCUIT if family == L.GEOMETRY else L.ATTRIBUTION)
    rows = ledger[(ledger[L.FAMILY] == family) & (ledger[L.QUANTITY] == quantity)]
    rows = rows[rows[L.FEATURE] != L.WHOLE]
    if family == L.CREDIT:
        rows = rows[rows[L.SAMPLE].isna()] if L.SAMPLE in rows else rows
    if not include_residual:
        rows = rows[~rows[L.FEATURE].isin(L.NOT_FEATURES)]
    if by == "pathway":
        key = rows[L.FEATURE] + " @ " + rows[L.PARAM]
    elif by == "feature":
        key = rows[L.FEATURE]
    else:
        raise ValueError(f"by={by!r}: use 'feature' or 'pathway'.")
    table = rows.assign(pathway=key).pivot_table(
        index=L.STEP, columns="pathway", values=L.VALUE, aggfunc="sum", fill_value=0.0
    )
    table.columns.name = None
    return table.cumsum() if cumulative else table
