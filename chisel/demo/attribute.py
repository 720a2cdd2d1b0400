"""Stage 3: attribute the recorded updates with all three families into one ledger.

Geometry + integrated run on every `attribute_every`-th update; credit needs per-sample
factors, so it runs on the updates that have them (multiples of `factors_every`), where all
three families are computed in one pass (one path integral per step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

import chisel
import probes
from chisel.agents.ppo import TrashAgent
from chisel.attribution import ledger as L
from chisel.demo.config import CREDIT_BY, DemoConfig
from chisel.report.artifacts import LEDGER_FILE


@dataclass(frozen=True)
class AttributionPlan:
    """Which updates get which families."""

    sample: list[int]  # geometry + integrated: every attribute_every-th update
    credit: list[int]  # + credit: the updates with per-sample factors (multiples of K)


def attribution_plan(n_steps: int, cfg: DemoConfig) -> AttributionPlan:
    credit = list(range(0, n_steps, cfg.factors_every))
    sample = sorted(set(range(0, n_steps, cfg.attribute_every)) | set(credit))
    return AttributionPlan(sample, credit)


def attribute_run(
    run: chisel.Run,
    agent: TrashAgent,
    features: probes.FeatureSet,
    metric: Callable,
    plan: AttributionPlan,
    cfg: DemoConfig,
) -> pd.DataFrame:
    """One ledger: all three families on the credit steps, geometry + integrated on the rest.

    Two calls so that no step's path integral is computed twice; rows sorted by step.
    """
    common = {"points": cfg.points, "progress": True}
    credit = chisel.attribute(
        run,
        agent,
        features,
        metric,
        steps=plan.credit,
        families=L.FAMILIES,
        horizon=cfg.horizon,
        credit_by=list(CREDIT_BY),
        **common,
    )
    rest = [t for t in plan.sample if t not in set(plan.credit)]
    other = chisel.attribute(
        run, agent, features, metric, steps=rest, families=(L.GEOMETRY, L.INTEGRATED), **common
    )
    tags = [c for c in credit.columns if c.startswith(L.TAG_PREFIX)]
    ledger = L.to_frame(pd.concat([credit, other], ignore_index=True), tags)
    ledger = ledger.sort_values(L.STEP, kind="stable", ignore_index=True)
    writer = L.LedgerWriter(run.path / LEDGER_FILE, tags)
    try:
        writer.write(ledger)
    except BaseException:
        writer.abort()  # a half-written ledger never takes the finished one's name
        raise
    writer.close()
    return ledger
