"""Predict θ without some samples: subtract their parts of every recorded update.

Credit splits each update Δθ_t into weight decay, sample terms (this step's samples, and
earlier steps' through the momentum buffer), unresolved parts and a residual. A sample i of
step s enters update t ≥ s as coef_{t,s} ⊙ layout(g_i x_iᵀ), so its whole effect up to step u
is (Σ_{s≤t<u} coef_{t,s}) ⊙ layout(g_i x_iᵀ): the coefficients are summed per origin step while
the steps are split, and each selection's weighted factor product is formed once per origin step
(one matmul per module and selection, no per-sample gradients).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from chisel.attribution.credit import MAX_HORIZON, MIN_WEIGHT, CreditSession, SampleBlock
from chisel.attribution.credit_parts import SAMPLE_LESS
from chisel.attribution.functional import ParamSpace
from chisel.counterfactual.result import Counterfactual, Params
from chisel.counterfactual.selection import CounterfactualError, Selection
from chisel.store.reader import Run


def _zeros(like: Params) -> Params:
    return {n: torch.zeros_like(v, dtype=torch.float64) for n, v in like.items()}


class _Pass:
    """One pass over the run's steps, accumulating each selection's removed part."""

    def __init__(self, run: Run, selections: Sequence[Selection], session: CreditSession) -> None:
        self.run, self.selections, self.session = run, list(selections), session
        self.theta0 = {n: v.double() for n, v in run.params(0).items()}
        self.removed = [_zeros(self.theta0) for _ in self.selections]
        self.non_sample = _zeros(self.theta0)
        self.unresolved = _zeros(self.theta0)
        # origin step -> (param, module) -> (a block of its samples, Σ coef over the updates it
        # entered); keyed by module too: a tied weight has one block per module using it
        self.pending: dict[int, dict[tuple[str, str], tuple[SampleBlock, Any]]] = {}
        self.weights: dict[int, list[Tensor]] = {}
        self.removed_weight = [0.0] * len(self.selections)
        self.samples = self.steps = self.without_factors = 0

    def step(self, t: int) -> None:
        split = self.session.split(t)
        self.steps += 1
        if self.session.factors(t) is None:
            self.without_factors += 1
        for b in split.blocks:
            entry = self.pending.setdefault(b.origin_step, {})
            key = (b.param, b.module)
            old = entry.get(key)
            entry[key] = (b, b.coef) if old is None else (old[0], old[1] + b.coef)
        # the sample-less leaves (not `split.leaves()`, which would sum every block again)
        for leaf in SAMPLE_LESS:  # parts with no samples: kept whole
            unresolved = leaf in split.unresolved
            for n, v in (split.unresolved if unresolved else split.base.parts)[leaf].items():
                self.non_sample[n] += v
                if unresolved:
                    self.unresolved[n] += v
        # no later step reaches back further than `reach`: those origins are final
        for s in [s for s in self.pending if s < t + 1 - self.session.reach]:
            self._add(self.removed, self.pending.pop(s), s)
            self.weights.pop(s, None)  # counted already; never asked for again

    def _weights(self, s: int, block: SampleBlock) -> list[Tensor]:
        if s not in self.weights:
            factors = self.session.factors(s)
            tags = dict(factors.tags) if factors is not None else {}
            ws = [sel.weights(s, tags, block.n) for sel in self.selections]
            self.weights[s] = ws
            self.samples += block.n
            for k, w in enumerate(ws):
                self.removed_weight[k] += float(w.sum())
        return self.weights[s]

    def _add(
        self, into: list[Params], entry: dict[tuple[str, str], tuple[SampleBlock, Any]], s: int
    ) -> None:
        for (param, _module), (block, coef) in entry.items():
            for k, w in enumerate(self._weights(s, block)):
                if not bool(w.any()):
                    continue
                weighted = dataclasses.replace(block, g=block.g * w[:, None, None], coef=coef)
                into[k][param] += weighted.total(into[k][param].shape)

    def snapshot(self) -> list[Params]:
        """Each selection's removed part so far, the still-open origins included."""
        out = [{n: v.clone() for n, v in r.items()} for r in self.removed]
        for s, entry in self.pending.items():
            self._add(out, entry, s)
        return out


def predict(
    run: Run,
    selections: Sequence[Selection],
    names: Sequence[str],
    *,
    at: Sequence[int],
    horizon: int | None,
    metric: Callable[[nn.Module], Tensor] | None = None,
    model: nn.Module | None = None,
) -> list[list[Counterfactual]]:
    """[checkpoint][selection] counterfactuals at each step of `at` (ascending), in one pass."""
    at = sorted(set(at))
    horizon = default_horizon(run) if horizon is None else horizon
    session = CreditSession(run, horizon=horizon)
    space = ParamSpace(model, metric) if metric is not None else None
    p = _Pass(run, selections, session)
    out: list[list[Counterfactual]] = []
    t = 0
    for u in at:
        while t < u:
            if not run.record(t).skipped:
                p.step(t)
            t += 1
        removed = p.snapshot()
        final = {n: v.double() for n, v in run.params(u).items()}
        m_final = _metric(space, final)
        row = []
        for k, name in enumerate(names):
            predicted = {n: final[n] - removed[k][n] for n in final}
            row.append(
                Counterfactual(
                    selection=name,
                    step=u,
                    horizon=horizon,
                    initial=p.theta0,
                    final=final,
                    predicted=predicted,
                    removed=removed[k],
                    non_sample={n: v.clone() for n, v in p.non_sample.items()},
                    unresolved={n: v.clone() for n, v in p.unresolved.items()},
                    removed_weight=p.removed_weight[k],
                    samples=p.samples,
                    steps=p.steps,
                    steps_without_factors=p.without_factors,
                    metric_final=m_final,
                    metric_predicted=_metric(space, predicted),
                    metric_name=repr(metric) if metric is not None else "",
                )
            )
        out.append(row)
    return out


def _metric(space: ParamSpace | None, params: Params) -> float | None:
    if space is None:
        return None
    with torch.no_grad():
        return float(space.check(space.call(params)))


def check_run(run: Run, until: int | None) -> int:
    """The step to predict at (len(run) by default), after checking the run can give credit."""
    config = run.manifest.get("config", {})
    if not config.get("grads"):
        raise CounterfactualError(
            "a counterfactual needs the gradients the optimizer consumed; this run was recorded "
            "with grads=False. Record with grads=True (the default)."
        )
    if not run.manifest.get("factor_modules"):
        raise CounterfactualError(
            "this run has no per-sample factors, so no sample's part of an update is known; "
            "record with factors=True (or factors=[module names]) and factors_every=1."
        )
    end = len(run)
    step = end if until is None else int(until)
    if not 0 <= step <= end:
        raise CounterfactualError(f"until={until}: give a step in [0, {end}] (θ before that step).")
    return step


def default_horizon(run: Run) -> int | None:
    """Credit's default reach as a number of steps: the earlier steps whose momentum weight is
    still >= 1% (β^k >= MIN_WEIGHT: 44 for Adam's β1 = 0.9, 0 without momentum), so that both the
    credit session and the prediction keep only those steps' factors in memory. Read from the
    recorded param group (torch's "betas" / "momentum"); None when it holds neither."""
    first = next((t for t in range(len(run)) if not run.record(t).skipped), None)
    groups = list(run.record(first).groups) if first is not None else None
    group = groups[0] if groups else {}
    if group.get("betas"):
        decay = float(group["betas"][0])
    elif "momentum" in group:
        decay = float(group.get("momentum") or 0.0)
    else:
        return None
    if decay <= 0:
        return 0
    if decay >= 1:
        return MAX_HORIZON
    return min(MAX_HORIZON, math.floor(math.log(MIN_WEIGHT) / math.log(decay)) + 1)
