"""Stage 4: validation by intervention (validation.parquet, validation.json).

On the trained model, with the attribution's own metric and held-out test prompts: every
feature pathway of the weights reading the stream reverted alone over the whole run, the
Shapley values of that reversion game, and every feature ablated (projected out of the stream,
centred on its mean over the probe prompts) on the metric and on the conflict accuracy (greedy
reward rate on test prompts whose marker contradicts the cue).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

import chisel
import probes
from chisel.attribution import ledger as L
from chisel.demo_lm import task as T
from chisel.demo_lm.config import LMDemoConfig
from chisel.report.artifacts import VALIDATION_FILE, VALIDATION_SUMMARY_FILE
from chisel.validation import _common as C
from chisel.validation import agreement, validation_table

METRIC_SCORE, CONFLICT_SCORE = "metric", "conflict_accuracy"


def conflict_accuracy(prompts: T.Prompts, completion_len: int) -> Callable[[torch.nn.Module], float]:
    """Greedy reward rate on the prompts whose marker contradicts the cue."""
    conflict = ~prompts.agrees
    ids, target = prompts.ids[conflict], prompts.target[conflict]

    def score(model: torch.nn.Module) -> float:
        ends = T.complete(model, ids, completion_len, None)[:, -1]
        return float((ends == target).double().mean())

    return score


def validation_stage(
    run: chisel.Run,
    model: torch.nn.Module,
    features: probes.FeatureSet,
    metric: Callable,
    ledger: pd.DataFrame,
    probe_prompts: T.Prompts,
    cfg: LMDemoConfig,
) -> dict[str, Any]:
    """Write validation.parquet and validation.json into the run; return the summary."""
    removal = chisel.pathway_effects(run, model, features, metric)
    shapley = chisel.pathway_shapley(
        run, model, features, metric, permutations=cfg.validation_permutations, seed=cfg.seed,
        players="features",
    )
    scores = {METRIC_SCORE: metric,
              CONFLICT_SCORE: conflict_accuracy(probe_prompts, cfg.completion_len)}
    ablation = chisel.ablation_effects(model, features, scores, probe_prompts.ids,
                                       dtype=torch.float64)
    table = validation_table(ledger, removal, shapley, ablation)
    table.to_parquet(cfg.out / VALIDATION_FILE, index=False)
    summary = _summary(table, removal, shapley, ledger)
    (cfg.out / VALIDATION_SUMMARY_FILE).write_text(
        json.dumps(_finite(summary), indent=1, allow_nan=False)
    )
    return summary


def _summary(
    table: pd.DataFrame, removal: pd.DataFrame, shapley: pd.DataFrame, ledger: pd.DataFrame
) -> dict[str, Any]:
    pathways = table[table[C.KIND] != C.KIND_GROUP]
    rho = {
        f"{r.x}_vs_{r.y}": {"rho": r.rho, "n": int(r.n), "transform": r.transform}
        for r in agreement(pathways).itertuples()
    }
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
        "shapley_sum": float(named[C.SHAPLEY].sum()),
        "shapley_max_se": float(pathways[C.SHAPLEY_SE].max()),
        "coverage_shapley": float(named[C.SHAPLEY].sum()) / whole if whole else math.nan,
        "coverage_attribution": float(shares[L.VALUE].sum()) / delta if delta else math.nan,
        "evaluations": int(removal.attrs["evaluations"] + shapley.attrs["evaluations"]),
        "permutations": int(shapley.attrs["permutations"]),
        "players": len(shapley),
        "shapley_players": "features",
        "window": list(shapley.attrs["window"]),
        "centred": True,
    }


def _finite(value: Any) -> Any:
    """NaN / inf as null, so the JSON is strict."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
