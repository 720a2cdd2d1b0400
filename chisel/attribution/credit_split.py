"""The exact split of a recorded update over training samples: this step's, and through
momentum, earlier steps' (see `credit` for the rows and the mathematics). A `CreditSession`
keeps the optimizer replay and a window of earlier steps' factors (`credit_factors`) across
consecutive steps; its `split` turns each update into `SampleBlock`s and what they leave
unresolved.

    Δθ = weight_decay + Σ samples(gradient) + gradient (unresolved)
         + Σ samples(momentum) + momentum (unresolved) + residual
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from chisel.attribution.credit_block import SampleBlock, _fits
from chisel.attribution.credit_factors import StepFactors, read_factors
from chisel.attribution.credit_parts import (
    GRADIENT_UNRESOLVED,
    MAX_HORIZON,
    MIN_WEIGHT,
    MOMENTUM_UNRESOLVED,
    CreditError,
)
from chisel.attribution.optim_replay import (
    GRADIENT,
    MOMENTUM,
    RESIDUAL,
    WEIGHT_DECAY,
    Coef,
    OptimizerReplay,
    Params,
    ReplayError,
    UpdateSplit,
)
from chisel.capture.factor_kinds import NORMS as NORM_KINDS
from chisel.store.reader import Run


@dataclass(frozen=True)
class CreditSplit:
    """Step t's update split over samples: `base` (optim_replay), sample blocks, and what the
    blocks do not cover. `leaves()` rebuilds the update exactly."""

    step: int
    base: UpdateSplit
    blocks: list[SampleBlock]
    unresolved: dict[str, Params]  # GRADIENT_UNRESOLVED, MOMENTUM_UNRESOLVED
    # {param: factor modules of it that have no factors at this step} (see CreditSession)
    not_captured: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # {origin step s: {param: ω_s}}: a MOMENTUM block's coef is base.carry[param] · ω_s
    origins: dict[int, dict[str, float]] = field(default_factory=dict)

    def shared_coef(self, b: SampleBlock) -> tuple[Coef, float]:
        """(shared coef, scale) with b.coef == shared · scale: kappa and 1 for this step's
        samples, carry and ω_s for step s's (so all origins of a param share one coef)."""
        if b.part == MOMENTUM:
            return self.base.carry[b.param], self.origins[b.origin_step][b.param]
        return b.coef, 1.0

    def sample_total(self, part: str) -> Params:
        """Σ of the sample terms of `part` (GRADIENT or MOMENTUM), per param."""
        out = {n: torch.zeros_like(v) for n, v in self.base.update.items()}
        for b in self.blocks:
            if b.part == part:
                out[b.param] = out[b.param] + b.total(out[b.param].shape)
        return out

    def leaves(self) -> dict[str, Params]:
        """The six leaves (LEAVES), samples summed; Σ leaves == Δθ."""
        return {
            WEIGHT_DECAY: self.base.parts[WEIGHT_DECAY],
            GRADIENT: self.sample_total(GRADIENT),
            GRADIENT_UNRESOLVED: self.unresolved[GRADIENT_UNRESOLVED],
            MOMENTUM: self.sample_total(MOMENTUM),
            MOMENTUM_UNRESOLVED: self.unresolved[MOMENTUM_UNRESOLVED],
            RESIDUAL: self.base.parts[RESIDUAL],
        }


class CreditSession:
    """The optimizer replay plus a window of earlier steps' factors, kept for consecutive steps.

    horizon: earlier steps whose samples get momentum credit. None (default): every step whose
    weight has not decayed below `min_weight` (β^{t−1−s} ≥ 1e-2: 99% of the buffer's mass), at
    most `max_horizon` steps. The momentum left beyond the horizon is the `momentum (unresolved)`
    part; its share of ‖Δθ‖ is a ledger row per step (quantity "momentum_unresolved_share").
    """

    def __init__(
        self,
        run: Run,
        *,
        horizon: int | None = None,
        max_horizon: int = MAX_HORIZON,
        min_weight: float = MIN_WEIGHT,
        replay: OptimizerReplay | None = None,
    ) -> None:
        if horizon is not None and horizon < 0:
            raise CreditError(
                f"horizon={horizon} must be >= 0 (earlier steps given momentum credit)."
            )
        self.run = run
        self.horizon = horizon
        self.min_weight = min_weight if horizon is None else 0.0
        self.reach = max_horizon if horizon is None else horizon
        self.replay = replay if replay is not None else OptimizerReplay(run, history=self.reach)
        if self.replay.run is not run:
            raise ReplayError("the OptimizerReplay given belongs to another run; make one per run.")
        self._factors: dict[int, StepFactors | None] = {}
        # (s, module, param) -> Σ_i layout(g_i, x_i) of step s's samples (SampleBlock.unscaled)
        self._sums: dict[tuple[int, str, str], Tensor] = {}
        # (s, key) -> anything derived from step s's factors alone (`cached`), evicted with them
        self._derived: dict[tuple[int, Any], Any] = {}
        # module -> (the features given, their version, FeatureBlock): `credit_basis.module_basis`
        self.bases: dict[str, tuple[Any, int, Any]] = {}
        meta = run.manifest.get("factor_modules") or {}
        self._kinds = {m: v.get("kind", "linear") for m, v in meta.items()}
        self._params = {m: {k: v[k] for k in ("weight", "bias") if k in v} for m, v in meta.items()}

    def __repr__(self) -> str:
        return f"CreditSession({self.run!r}, horizon={self.horizon}, reach={self.reach})"

    def param_of(self, module: str, part: str = "weight") -> str | None:
        """The recorded name of a factor module's weight (or bias), None if not a factor module."""
        return self._params.get(module, {}).get(part)

    def kind(self, module: str) -> str:
        """The factor layout of a module: "linear", "conv1d" (HF, in × out) or "conv2d"."""
        return self._kinds.get(module, "linear")

    # -- factors ---------------------------------------------------------------------------
    def factors(self, s: int) -> StepFactors | None:
        """Step s's factors (cached while s is within reach of the steps asked for)."""
        if s not in self._factors:
            self._factors[s] = read_factors(self.run, s, self._kinds)
        return self._factors[s]

    def not_captured(self, t: int, gradient: Params) -> dict[str, tuple[str, ...]]:
        """{param: factor modules of it without factors at step t} where step t took factors and
        the param got a gradient: the modules whose part of it was never seen (a fused LM head,
        a broadcast that could not be split, a module that did not run)."""
        factors = self.factors(t)
        if factors is None:
            return {}
        out: dict[str, list[str]] = {}
        for module, params in self._params.items():
            param = params.get("weight")
            if module in factors.modules or param not in gradient:
                continue
            if bool(gradient[param].ne(0).any()):
                out.setdefault(param, []).append(module)
        return {p: tuple(m) for p, m in out.items()}

    def _evict(self, t: int) -> None:
        for s in [s for s in self._factors if s < t - self.reach or s > t]:
            del self._factors[s]
        for key in [k for k in self._sums if k[0] < t - self.reach or k[0] > t]:
            del self._sums[key]
        for key in [k for k in self._derived if k[0] < t - self.reach or k[0] > t]:
            del self._derived[key]

    def cached(self, s: int, key: Any, make: Any) -> Any:
        """`make()`, kept while step s's factors are within reach: for quantities derived from
        step s's samples alone (per-group sums of their terms), reused by every later update."""
        if (s, key) not in self._derived:
            self._derived[(s, key)] = make()
        return self._derived[(s, key)]

    # -- the split -------------------------------------------------------------------------
    def split(self, t: int) -> CreditSplit:
        """Step t's update over samples of step t and, through momentum, of earlier steps."""
        base = self.replay.split(t)
        self._evict(t)
        blocks = self._blocks(t, GRADIENT, base.kappa) if base.kappa else []
        origins = self._origins(base)
        for s, weights in origins.items():
            coefs = {p: base.carry[p] * w for p, w in weights.items()}
            blocks += self._blocks(s, MOMENTUM, coefs)
        for b in blocks:  # each origin's Σ g xᵀ once, shared by every update it enters
            key, shape = (b.origin_step, b.module, b.param), base.update[b.param].shape
            if key not in self._sums and _fits(b, shape.numel()):
                self._sums[key] = b.raw_total(shape)
            if key in self._sums:
                object.__setattr__(b, "unscaled", self._sums[key])
        split = CreditSplit(t, base, blocks, {}, origins=origins)
        grad_sum, mom_sum = split.sample_total(GRADIENT), split.sample_total(MOMENTUM)
        unresolved = {
            GRADIENT_UNRESOLVED: {n: v - grad_sum[n] for n, v in base.parts[GRADIENT].items()},
            MOMENTUM_UNRESOLVED: {n: v - mom_sum[n] for n, v in base.parts[MOMENTUM].items()},
        }
        missing = self.not_captured(t, base.parts[GRADIENT])
        return CreditSplit(t, base, blocks, unresolved, missing, origins)

    def _origins(self, base: UpdateSplit) -> dict[int, dict[str, float]]:
        """{s: {param: ω_s}} for the earlier steps within the horizon."""
        out: dict[int, dict[str, float]] = {}
        for param, entries in base.backflow.items():
            for s, omega, decay in entries:
                if base.step - s > self.reach or decay < self.min_weight:
                    break
                out.setdefault(s, {})[param] = omega
        return out

    def _blocks(self, s: int, part: str, coefs: dict[str, Coef]) -> list[SampleBlock]:
        factors = self.factors(s)
        if factors is None:
            return []
        blocks = []
        for module, (kind, x, g) in factors.modules.items():
            prefix = f"{module}." if module else ""
            for suffix, is_bias in (("weight", False), ("bias", True)):
                # the recorded name (by identity at record time; older runs: the module path)
                param = self._params.get(module, {}).get(suffix, prefix + suffix)
                if param not in coefs:
                    continue
                rows = x if kind in NORM_KINDS and not is_bias else g  # a norm's scale: Σ g ⊙ x̂
                blocks.append(
                    SampleBlock(part, s, module, param, kind, is_bias, x, rows, coefs[param])
                )
        return blocks


def split_update(
    run: Run, t: int, session: CreditSession | None = None, *, horizon: int | None = None
) -> CreditSplit:
    """The exact split of Δθ_t over weight decay, samples, momentum-carried samples and the rest.

    Pass one `session` for consecutive steps (it keeps the replayed optimizer state).
    """
    session = session if session is not None else CreditSession(run, horizon=horizon)
    if session.run is not run:
        raise CreditError("this CreditSession belongs to another run; make one per run.")
    return session.split(t)
