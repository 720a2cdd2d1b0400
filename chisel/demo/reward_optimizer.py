"""Is the agent a reward optimizer, and did the ledger see it coming?

- `agent_choice`: the choice test (`chisel.envs.choice_test`) of a TrashAgent, sampling its
  policy with a seeded generator.
- `routing`: the mechanistic predictor, read from a ledger: of the action-selection
  reinforcement (integrated attribution of the log-probability metric, summed over the weights
  that read each feature) that went through reward-predictive or task features, the share that
  went through the reward-predictive ones, cumulated over training steps.
- `checkpoint_routing`: the same predictor using only what existed at a checkpoint: probes
  fitted on the checkpoint agent's own rollouts, its own greedy actions as the metric, and the
  updates before the checkpoint (nothing from the future of the run).

docs/reward-optimizer.md defines the terms.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

import chisel
import probes
from chisel.agents.ppo import TrashAgent, agent_policy
from chisel.attribution import ledger as L
from chisel.demo import features as Fe
from chisel.demo.config import ACTOR_INPUT_SITES, REWARD_WITHIN
from chisel.demo.data import rollout, subsample
from chisel.envs import ChoiceResult, TrashWorldConfig, choice_test
from chisel.errors import ChiselError

REWARD_PREDICTIVE, TASK = "reward_predictive", "task"
ROUTING_GROUPS: dict[str, tuple[str, ...]] = {
    REWARD_PREDICTIVE: (REWARD_WITHIN,),
    TASK: ("trash_visible", "trash_adjacent", "holding_trash", "at_can"),
}
"""The concepts of each side of the predictor (the demo's concept groups of the same names)."""


class RoutingError(ChiselError, ValueError):
    """The ledger has no integrated attribution through the predictor's features."""


def agent_choice(
    agent: TrashAgent,
    rooms: int = 64,
    *,
    seed: int = 0,
    config: TrashWorldConfig | None = None,
    greedy: bool = False,
    max_steps: int = 40,
) -> ChoiceResult:
    """The choice test of `agent` (its sampled policy unless greedy), rooms and sampling seeded."""
    gen = torch.Generator().manual_seed(seed)
    policy = agent_policy(agent, greedy=greedy, generator=gen)
    return choice_test(policy, rooms, seed=seed, config=config, max_steps=max_steps)


@dataclass(frozen=True)
class Routing:
    """Cumulative reinforcement through each side of the predictor, per attributed step."""

    steps: np.ndarray  # [S] attributed steps, ascending
    reward_predictive: np.ndarray  # [S] Σ_{f ∈ rp} |Σ_{τ ≤ t} A_f(τ)|
    task: np.ndarray  # [S] the same over the task features
    features: dict[str, str]  # {feature name: group} of the features counted

    @property
    def share(self) -> np.ndarray:
        """[S] reward_predictive / (reward_predictive + task); nan where both are 0."""
        total = self.reward_predictive + self.task
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, self.reward_predictive / total, np.nan)

    @property
    def final_share(self) -> float:
        return float(self.share[-1]) if len(self.steps) else float("nan")

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"step": self.steps, REWARD_PREDICTIVE: self.reward_predictive,
                             TASK: self.task, "share": self.share})


def routing(
    ledger: pd.DataFrame,
    concepts: Mapping[str, str],
    groups: Mapping[str, Sequence[str]] = ROUTING_GROUPS,
) -> Routing:
    """The predictor's curve from a ledger's integrated attribution rows.

    concepts: {feature name: concept} (demo.json "feature_concepts"; `feature_concepts`).
    A feature's reinforcement at step t is its cumulative integrated attribution A_f summed over
    the weights that read it; each side of the predictor sums |A_f| over its features (the
    report's abs_share, restricted to the two groups).
    """
    side = {c: g for g, cs in groups.items() for c in cs}
    member = {f: side[c] for f, c in concepts.items() if c in side}
    rows = ledger[(ledger[L.FAMILY] == L.INTEGRATED) & (ledger[L.QUANTITY] == L.ATTRIBUTION)
                  & ledger[L.FEATURE].isin(member)]
    if rows.empty:
        raise RoutingError(
            "The ledger has no integrated attribution rows through the reward-predictive or task "
            f"features (looked for {sorted(member) or 'none: no feature has a concept of '}"
            f"{'' if member else sorted(side)}); attribute with families including "
            "'integrated' and features named for those concepts.")
    cum = rows.pivot_table(index=L.STEP, columns=L.FEATURE, values=L.VALUE, aggfunc="sum",
                           fill_value=0.0).sort_index().cumsum().abs()
    def total(group: str) -> np.ndarray:
        cols = [f for f in cum.columns if member[f] == group]
        return cum[cols].sum(axis=1).to_numpy(np.float64) if cols else np.zeros(len(cum))

    return Routing(cum.index.to_numpy(np.int64), total(REWARD_PREDICTIVE), total(TASK),
                   {f: member[f] for f in cum.columns})


def agent_at(agent: TrashAgent, run: chisel.Run, step: int) -> TrashAgent:
    """A copy of `agent` holding the run's θ before `step` (`len(run)`: the final θ)."""
    out = copy.deepcopy(agent)
    params = run.params(step)
    own = out.state_dict()
    out.load_state_dict({k: params[k].to(v.dtype) if k in params else v for k, v in own.items()})
    return out


@dataclass(frozen=True)
class CheckpointRouting:
    """The predictor as it could be read at one checkpoint of a run."""

    step: int  # the checkpoint: θ before this step; updates 0 .. step-1 are attributed
    routing: Routing
    attributed_steps: int
    concepts: list[str]  # the concepts with a probe (both classes present in the rollout)


def checkpoint_routing(
    run: chisel.Run,
    agent: TrashAgent,
    step: int,
    env: TrashWorldConfig,
    *,
    button_on: bool,
    seed: int,
    every: int = 8,
    rooms: int = 32,
    rollout_steps: int = 48,
    metric_states: int = 512,
    reward_k: int = 8,
    points: int = 8,
) -> CheckpointRouting:
    """Fit probes on the agent at `step` (its own rollouts), and attribute every `every`-th update
    before `step` to them, with its own greedy actions as the metric."""
    if not 1 <= step <= len(run):
        raise RoutingError(f"step={step}: a checkpoint lies in 1..{len(run)} (the run's steps).")
    now = agent_at(agent, run, step)
    data = rollout(now, env, rooms=rooms, steps=rollout_steps, seed=seed, reward_k=reward_k,
                   button_on=button_on)
    wanted = {c for cs in ROUTING_GROUPS.values() for c in cs}
    concepts = [c for c in data.usable_concepts() if c in wanted]
    acts = probes.capture(now, data.obs, list(ACTOR_INPUT_SITES))
    feats = [probes.fit_probe(acts[s], data.labels[c], concept=c, name=f"{c}@{s}", site=s,
                              seed=seed)
             for s in ACTOR_INPUT_SITES for c in concepts]
    features = probes.FeatureSet(feats)
    held = rollout(now, env, rooms=rooms, steps=max(1, -(-metric_states // rooms)),
                   seed=seed + 1, reward_k=reward_k, button_on=button_on)
    held = subsample(held, metric_states, seed)
    metric = chisel.metrics.logprob(held.obs, held.greedy)
    steps = list(range(0, step, every))
    ledger = chisel.attribute(run, now, features, metric, steps=steps,
                              families=(L.INTEGRATED,), points=points, progress=False)
    return CheckpointRouting(step, routing(ledger, Fe.feature_concepts(features)), len(steps),
                             concepts)


DEMO_KEY = "reward_optimizer"  # demo.json: the choice test and the predictor of the demo's run


def demo_summary(
    agent: TrashAgent,
    ledger: pd.DataFrame,
    concepts: Mapping[str, str],
    env: TrashWorldConfig,
    seed: int,
    rooms: int = 64,
    curve_points: int = 64,
) -> dict:
    """demo.json's "reward_optimizer": the choice test of the final agent and the predictor read
    from the demo's own ledger (features fitted on the final agent), JSON-ready."""
    out: dict = {"choice_test": agent_choice(agent, rooms, seed=seed, config=env).summary(),
                 "choice_seed": seed}
    try:
        r = routing(ledger, concepts)
    except RoutingError as err:
        out["routing"], out["routing_missing"] = None, str(err)
        return out
    keep = np.unique(np.linspace(0, len(r.steps) - 1, min(curve_points, len(r.steps))).astype(int))
    out["routing"] = {
        "share": _num(r.final_share),
        "reward_predictive": float(r.reward_predictive[-1]),
        "task": float(r.task[-1]),
        "features": len(r.features),
        "curve": {"step": r.steps[keep].tolist(), "share": [_num(x) for x in r.share[keep]]},
    }
    return out


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
