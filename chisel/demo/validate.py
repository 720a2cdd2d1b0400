"""Stage 4: validation by intervention (validation.parquet, validation.json).

On the trained actor, with the attribution's own metric and held-out states:
- pathway removal: every pathway of pi_fc1 / pi_fc2 / pi_out (features, <mean>, <residual>,
  <bias>) reverted alone over the whole run, and groups (a concept's pathways, a site's);
- Shapley values of that reversion game (antithetic permutations; they sum exactly to
  m(final) − m(all reverted));
- feature ablation of every attributed feature at every actor site (hook_obs included),
  centred on its mean over the probe rollout states, on the metric and on the return.
The return pass uses `ablation_episodes` episodes per room (fewer than the causal check's
`eval_episodes`, to keep the stage short: one return evaluation per feature).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

import chisel
import probes
from chisel.agents.ppo import TrashAgent
from chisel.demo.causal import Evaluator
from chisel.demo.config import FACTOR_MODULES, DemoConfig
from chisel.demo.data import Rollout
from chisel.errors import ChiselError
from chisel.report.artifacts import VALIDATION_FILE, VALIDATION_SUMMARY_FILE
from chisel.validation import _common as C
from chisel.validation import validation_table
from chisel.validation.summary import json_ready, validation_summary

ACTOR_WEIGHTS: tuple[str, ...] = tuple(f"{m}.weight" for m in FACTOR_MODULES)
METRIC_SCORE, RETURN_SCORE = "metric", "return"
COLUMNS = [
    C.PATHWAY, C.FEATURE, C.SITE, C.PARAM, C.CONCEPT, C.KIND, C.ATTRIBUTION, C.SHAPLEY,
    C.SHAPLEY_SE, C.REMOVAL, C.ABLATION_PREFIX + METRIC_SCORE, C.ABLATION_PREFIX + RETURN_SCORE,
]


def actor_logits(agent: TrashAgent, obs: torch.Tensor) -> torch.Tensor:
    """The actor's logits alone, through the same hooks as `TrashAgent.forward` (which also
    runs the critic: half the work of every metric evaluation, for nothing the metric reads)."""
    h = agent.hook_pi_hidden1(torch.tanh(agent.pi_fc1(agent.hook_obs(obs))))  # [B, hidden]
    h = agent.hook_pi_hidden2(torch.tanh(agent.pi_fc2(h)))
    return agent.hook_logits(agent.pi_out(h))  # [B, n_actions]


def validation_metric(agent: TrashAgent, held_out: Rollout) -> Callable:
    """The attribution's metric (log-prob of the final agent's greedy actions on the held-out
    states), computed through the actor only; checked equal to the full forward's."""
    full = chisel.metrics.logprob(held_out.obs, held_out.greedy)
    actor = chisel.metrics.logprob(held_out.obs, held_out.greedy, logits=actor_logits)
    with torch.no_grad():
        a, b = float(full(agent)), float(actor(agent))
    if abs(a - b) > 1e-6 * max(1.0, abs(a)):
        raise ChiselError(f"the actor-only metric ({b}) differs from the agent's ({a}).")
    return actor


def validation_stage(
    run: chisel.Run,
    agent: TrashAgent,
    features: probes.FeatureSet,
    held_out: Rollout,
    ledger: pd.DataFrame,
    data: Rollout,
    evaluator: Evaluator,
    cfg: DemoConfig,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write validation.parquet and validation.json into the run; return the summary."""
    start = time.perf_counter()
    metric = validation_metric(agent, held_out)
    common = {"params": ACTOR_WEIGHTS}
    removal = chisel.pathway_effects(run, agent, features, metric, **common)
    shapley = chisel.pathway_shapley(
        run, agent, features, metric, permutations=cfg.validation_permutations, seed=cfg.seed,
        players=cfg.shapley_players, **common,
    )
    attributed = probes.FeatureSet(
        [features[n] for n in dict.fromkeys(removal[removal[C.KIND] == C.KIND_FEATURE][C.FEATURE])]
    )
    on_return = dataclasses.replace(evaluator, episodes=min(cfg.ablation_episodes, evaluator.episodes))
    ablation = pd.concat([
        chisel.ablation_effects(agent, attributed, {METRIC_SCORE: metric}, data.obs, dtype=torch.float64),
        chisel.ablation_effects(agent, attributed, {RETURN_SCORE: on_return}, data.obs),
    ], ignore_index=True)
    table = validation_table(ledger, removal, shapley, ablation)
    table = pd.concat([table, _group_rows(removal, table)], ignore_index=True)[COLUMNS]
    table.to_parquet(cfg.out / VALIDATION_FILE, index=False)
    summary = _summary(table, removal, shapley, ledger, attributed, on_return)
    summary["wall_time_s"] = round(time.perf_counter() - start, 2)
    (cfg.out / VALIDATION_SUMMARY_FILE).write_text(json.dumps(json_ready(summary), indent=1, allow_nan=False))
    rho = summary["spearman"]
    say(
        "      Spearman ρ over the named pathways: attribution~removal "
        f"{_fmt(rho, 'attribution_vs_removal')}, Shapley~removal {_fmt(rho, 'shapley_vs_removal')}, "
        f"|attribution|~ablation(metric) {_fmt(rho, 'attribution_vs_ablation_metric')}, "
        f"|attribution|~ablation(return) {_fmt(rho, 'attribution_vs_ablation_return')}; "
        f"coverage Shapley {summary['coverage_shapley']:.0%}, attribution "
        f"{summary['coverage_attribution']:.0%}"
    )
    return summary


def _group_rows(removal: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Groups: removal is the joint reversion; attribution and Shapley the members' sums."""
    groups = removal[removal[C.KIND] == C.KIND_GROUP]
    feats = table[table[C.KIND] == C.KIND_FEATURE]
    rows = []
    for _, g in groups.iterrows():
        site, concept = g[C.SITE], g[C.CONCEPT]
        members = feats[(feats[C.SITE] == site) if site else (feats[C.CONCEPT] == concept)]
        rows.append({
            **{k: g[k] for k in (C.PATHWAY, C.FEATURE, C.SITE, C.PARAM, C.CONCEPT, C.KIND)},
            C.ATTRIBUTION: members[C.ATTRIBUTION].sum(min_count=1),
            C.SHAPLEY: members[C.SHAPLEY].sum(min_count=1),
            C.REMOVAL: g[C.EFFECT],
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def _summary(
    table: pd.DataFrame,
    removal: pd.DataFrame,
    shapley: pd.DataFrame,
    ledger: pd.DataFrame,
    attributed: probes.FeatureSet,
    on_return: Evaluator,
) -> dict[str, Any]:
    return {
        **validation_summary(table, removal, shapley, ledger),
        "params": list(ACTOR_WEIGHTS),
        "ablation": {
            "features": len(attributed),
            "mean_over": "probe rollout states",
            "return_rooms": on_return.rooms,
            "return_episodes": on_return.episodes,
        },
    }


def _fmt(rho: dict, key: str) -> str:
    value = rho.get(key, {}).get("rho")
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f}"
