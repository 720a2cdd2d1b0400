"""Stage 4: validation by intervention (validation.parquet, validation.json).

On the trained model, with the attribution's own metric and held-out test prompts: every
feature pathway of the weights reading the stream reverted alone over the whole run, the
Shapley values of that reversion game, and every feature ablated (projected out of the stream,
centred on its mean over the probe prompts) on the metric and on the conflict accuracy (greedy
reward rate on test prompts whose marker contradicts the cue).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

import chisel
import probes
from chisel.demo_lm import task as T
from chisel.demo_lm.config import LMDemoConfig
from chisel.report.artifacts import VALIDATION_FILE, VALIDATION_SUMMARY_FILE
from chisel.validation import validation_table
from chisel.validation.summary import json_ready, validation_summary

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
    summary = validation_summary(table, removal, shapley, ledger)
    (cfg.out / VALIDATION_SUMMARY_FILE).write_text(
        json.dumps(json_ready(summary), indent=1, allow_nan=False)
    )
    return summary
