"""The causal check: does the attribution predict what the trained agent relies on?

Rank the probe directions at the chosen sites by their cumulative integrated attribution
(|Σ_t A_f|, the report's ranking), then project the k top, the k bottom and k random ones out
of the trained policy's activations and measure the return. Projection keeps the mean:
x ← x − P (x − μ), with P the orthogonal projection on the span of the site's chosen directions
and μ the site's mean activation on the probe states, so removing a direction removes the
information along it without shifting the layer as a whole (plain x − P x would also move every
downstream unit by −P μ, which hurts the return whatever the direction means).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

import probes
from chisel.agents.ppo import TrashAgent, agent_policy
from chisel.envs import TrashWorldConfig, VecTrashWorld, evaluate


@dataclass(frozen=True)
class Condition:
    """One row of causal.json's "conditions"."""

    name: str  # "top" | "bottom" | "random"
    features: list[str]
    ret: float
    seeds: int | None = None
    std: float | None = None

    def to_json(self) -> dict:
        out = {"name": self.name, "features": self.features, "return": self.ret}
        if self.seeds is not None:
            out.update(seeds=self.seeds, std=self.std)
        return out


@dataclass(frozen=True)
class Evaluator:
    """Mean return of the agent's sampled policy; fixed seeds, so conditions share randomness."""

    env: TrashWorldConfig
    rooms: int
    episodes: int
    seed: int
    button_on: bool

    def __call__(self, agent: TrashAgent) -> float:
        envs = VecTrashWorld(self.env, self.rooms, seed=self.seed)
        envs.set_button(self.button_on)
        gen = torch.Generator().manual_seed(self.seed)
        return evaluate(
            agent_policy(agent, generator=gen), envs, self.episodes, seed=self.seed
        ).mean_return


def rank(totals: pd.Series, candidates: Sequence[str]) -> list[str]:
    """Candidates by |cumulative attribution|, largest first (absent ones count as 0)."""
    values = totals.reindex(list(candidates)).fillna(0.0)
    return list(values.abs().sort_values(ascending=False, kind="stable").index)


def projection_hooks(
    features: probes.FeatureSet, names: Sequence[str], means: dict[str, torch.Tensor]
) -> list[tuple[str, Callable]]:
    """One forward hook per site: x − P(x − μ) over the chosen directions at that site."""
    hooks = []
    for site in sorted({features[n].site for n in names}):
        d = torch.stack([features[n].read.double() for n in names if features[n].site == site])
        q, _ = torch.linalg.qr(d.T)  # [dim, m] orthonormal basis of the span
        q, mu = q.float(), means[site].float()

        def hook(x: torch.Tensor, hook: object, q: torch.Tensor = q, mu: torch.Tensor = mu):
            return x - ((x - mu) @ q) @ q.T  # [B, dim]

        hooks.append((site, hook))
    return hooks


def causal_check(
    agent: TrashAgent,
    features: probes.FeatureSet,
    totals: pd.Series,
    sites: Sequence[str],
    k: int,
    seeds: int,
    means: dict[str, torch.Tensor],
    evaluator: Evaluator,
    seed: int,
) -> dict:
    """causal.json: baseline return, the top / bottom / random-k conditions, and each candidate
    direction projected out alone ("singles", in ranking order)."""
    candidates = [f.name for f in features if f.site in sites and f.source == "probe"]
    k = min(k, max(1, len(candidates) // 2))
    order = rank(totals, candidates)

    def run(names: Sequence[str]) -> float:
        with agent.hooks(fwd_hooks=projection_hooks(features, names, means)):
            return evaluator(agent)

    conditions = [
        Condition("top", order[:k], run(order[:k])),
        Condition("bottom", order[-k:], run(order[-k:])),
    ]
    rng = np.random.default_rng(seed)
    draws = [list(rng.choice(candidates, k, replace=False)) for _ in range(seeds)]
    returns = [run(names) for names in draws]
    conditions.append(
        Condition(
            "random",
            sorted({n for d in draws for n in d}),
            float(np.mean(returns)),
            seeds,
            float(np.std(returns)),
        )
    )
    singles = [
        {"feature": n, "total": float(totals.get(n, 0.0)), "return": run([n])} for n in order
    ]
    return {
        "k": k,
        "site": ", ".join(sites),
        "baseline": evaluator(agent),
        "centered": True,
        "ranking": "|cumulative integrated attribution|",
        "conditions": [c.to_json() for c in conditions],
        "random_returns": returns,
        "singles": singles,
    }
