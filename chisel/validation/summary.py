"""The numbers a validation run reports (validation.json): agreements, totals, coverage, cost."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from chisel.attribution import ledger as L
from chisel.validation import _common as C
from chisel.validation.agreement import agreement


def validation_summary(
    table: pd.DataFrame, removal: pd.DataFrame, shapley: pd.DataFrame, ledger: pd.DataFrame
) -> dict[str, Any]:
    """From `validation_table`, `pathway_effects` (the all-reverted row), `pathway_shapley` and
    the ledger: Spearman of every predictor/effect pair, Δm and the metric with every player
    reverted, the Shapley total (and its sum, equal by construction), the coverage of the named
    features under both measures, and what it cost. Values may be NaN (`json_ready` nulls them)."""
    pathways = table[table[C.KIND] != C.KIND_GROUP]
    rho = {
        f"{r.x}_vs_{r.y}": {"rho": r.rho, "n": int(r.n), "transform": r.transform}
        for r in agreement(pathways).itertuples()
    }
    # of the whole learned change, m(final) − m(every pathway reverted) = Δm
    whole = float(removal[C.METRIC_FINAL].iloc[0] - removal[C.METRIC_REVERTED].iloc[0])
    named = pathways[pathways[C.KIND] == C.KIND_FEATURE]
    integrated = ledger[ledger[L.FAMILY] == L.INTEGRATED]
    delta = float(integrated[integrated[L.QUANTITY] == L.DELTA_METRIC][L.VALUE].sum())
    shares = integrated[
        (integrated[L.QUANTITY] == L.ATTRIBUTION) & ~integrated[L.FEATURE].isin(L.NOT_FEATURES)
    ]
    return {
        "spearman": rho,
        "delta_metric": delta,
        "delta_metric_reverted": whole,
        "metric_final": float(shapley.attrs["metric_final"]),
        "metric_reverted": float(shapley.attrs["metric_all_reverted"]),
        "shapley_total": float(shapley.attrs["total"]),
        "shapley_sum": float(pathways[C.SHAPLEY].sum()),
        "shapley_max_se": float(pathways[C.SHAPLEY_SE].max()),
        "coverage_shapley": float(named[C.SHAPLEY].sum()) / whole if whole else math.nan,
        "coverage_attribution": float(shares[L.VALUE].sum()) / delta if delta else math.nan,
        "evaluations": int(removal.attrs["evaluations"] + shapley.attrs["evaluations"]),
        "permutations": int(shapley.attrs["permutations"]),
        "players": len(shapley),
        "shapley_players": "features" if set(shapley[C.KIND]) == {C.KIND_FEATURE} else "all",
        "window": list(shapley.attrs["window"]),
        "centred": True,
    }


def json_ready(value: Any) -> Any:
    """NaN / inf as null (recursively), so the JSON is strict."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
