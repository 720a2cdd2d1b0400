"""Stage 3: the metric, and all three attribution families over the recorded updates.

The metric is the mean log-prob of the final model's greedy ending on held-out test prompts
(marker independent of the cue): what the policy became, so a feature's share says how much of
that change ran through the feature. Geometry + integrated on every `attribute_every`-th update,
all three families on the updates with per-sample factors; credit summed by the tags `CREDIT_BY`.

A second metric asks about the shortcut itself (`marker_metric`: the log-prob of the marker's
ending where the marker contradicts the cue), attributed with the integrated family alone on the
same updates (ledger_marker.parquet): did the updates raise it, and through which features?
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch

import chisel
import probes
from chisel.attribution import ledger as L
from chisel.demo_lm import task as T
from chisel.demo_lm.config import CREDIT_BY, LMDemoConfig
from chisel.report.artifacts import LEDGER_FILE

METRIC_NAME = "log-prob of the final model's greedy ending on held-out test prompts"
MARKER_METRIC_NAME = "log-prob of the marker's ending on test prompts where it contradicts the cue"
MARKER_LEDGER_FILE = "ledger_marker.parquet"  # integrated attribution of the marker metric


@dataclass(frozen=True)
class MetricData:
    """Held-out test prompts, the sequences the metric scores and the final model's choice."""

    prompts: T.Prompts
    ids: torch.Tensor  # [N, T]: prompt + greedy completion without its last token
    chosen: torch.Tensor  # [N]: the final model's greedy ending

    def metric(self) -> Callable[[torch.nn.Module], torch.Tensor]:
        ids, chosen = self.ids, self.chosen

        def metric(model: torch.nn.Module) -> torch.Tensor:
            logp = torch.log_softmax(T.logits(model, ids)[:, -1], -1)  # [N, V]
            return logp.gather(-1, chosen[:, None]).mean()

        return metric


def metric_data(model: torch.nn.Module, prompts: T.Prompts, completion_len: int) -> MetricData:
    greedy = T.complete(model, prompts.ids, completion_len, None)  # [N, L]
    ids = torch.cat([prompts.ids, greedy[:, :-1]], 1)
    return MetricData(prompts, ids, greedy[:, -1])


def marker_metric(prompts: T.Prompts) -> Callable[[torch.nn.Module], torch.Tensor]:
    """The shortcut itself: mean log-prob of the marker's ending on the test prompts whose
    marker contradicts the cue (one-token completions: the ending is the next token)."""
    conflict = ~prompts.agrees
    ids = prompts.ids[conflict]  # [M, PROMPT_LEN]
    follow = torch.tensor(T.ENDS)[prompts.marker[conflict]]  # [M]

    def metric(model: torch.nn.Module) -> torch.Tensor:
        logp = torch.log_softmax(T.logits(model, ids)[:, -1], -1)  # [M, V]
        return logp.gather(-1, follow[:, None]).mean()

    return metric


def attribute_marker(
    run: chisel.Run,
    model: torch.nn.Module,
    features: probes.FeatureSet,
    prompts: T.Prompts,
    plan: AttributionPlan,
    cfg: LMDemoConfig,
) -> pd.DataFrame:
    """Integrated attribution of `marker_metric` on the sampled updates (MARKER_LEDGER_FILE)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*have no recorded bias")
        ledger = chisel.attribute(
            run, model, features, marker_metric(prompts), steps=plan.sample,
            families=(L.INTEGRATED,), points=cfg.points, progress=False,
        )
    ledger.to_parquet(run.path / MARKER_LEDGER_FILE, index=False)
    return ledger


@dataclass(frozen=True)
class AttributionPlan:
    sample: list[int]  # geometry + integrated
    credit: list[int]  # + credit: the updates with factors


def attribution_plan(n_steps: int, cfg: LMDemoConfig) -> AttributionPlan:
    credit = list(range(0, n_steps, cfg.factors_every))
    sample = sorted(set(range(0, n_steps, cfg.attribute_every)) | set(credit))
    return AttributionPlan(sample, credit)


def attribute_run(
    run: chisel.Run,
    model: torch.nn.Module,
    features: probes.FeatureSet,
    metric: Callable,
    plan: AttributionPlan,
    cfg: LMDemoConfig,
    progress: bool = False,
) -> pd.DataFrame:
    """One ledger (ledger.parquet): all families on the credit steps, the rest without credit."""
    common = {"points": cfg.points, "progress": progress}
    parts = [chisel.attribute(
        run, model, features, metric, steps=plan.credit, families=L.FAMILIES,
        horizon=cfg.horizon, credit_by=list(CREDIT_BY), **common,
    )]
    rest = [t for t in plan.sample if t not in set(plan.credit)]
    if rest:
        with warnings.catch_warnings():  # the first call already said it (the tied head's split)
            warnings.filterwarnings("ignore", message=".*have no recorded bias")
            parts.append(chisel.attribute(
                run, model, features, metric, steps=rest, families=(L.GEOMETRY, L.INTEGRATED),
                **common,
            ))
    tags = [c for c in parts[0].columns if c.startswith(L.TAG_PREFIX)]
    ledger = L.to_frame(pd.concat(parts, ignore_index=True), tags)
    ledger = ledger.sort_values(L.STEP, kind="stable", ignore_index=True)
    writer = L.LedgerWriter(run.path / LEDGER_FILE, tags)
    try:
        writer.write(ledger)
    finally:
        writer.close()
    return ledger
