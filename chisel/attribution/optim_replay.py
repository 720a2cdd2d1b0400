"""Replay the optimizer from a keyframe and split each recorded update exactly.

For step t the recorded update splits into parts that sum to it exactly (float64):

    Δθ_t = weight_decay + momentum + gradient + residual

- `gradient`: this step's gradient times the factor κ the optimizer applies to it (SGD:
  −lr·(1−dampening), Nesterov −lr·(1+μ(1−dampening)), the first momentum step undamped; Adam:
  −(lr/(1−β1^k))·(1−β1)/D with D = sqrt(v_k)/sqrt(1−β2^k) + eps held fixed at this step).
- `momentum`: what the buffer carries from earlier steps (SGD μ·buf_{t−1}, Nesterov μ²·buf_{t−1};
  Adam −(lr/(1−β1^k))·β1·m_{t−1}/D).
- `weight_decay`: decoupled decay (AdamW) or the L2 term that enters the gradient (SGD, Adam).
- `residual`: the recorded update minus the modelled parts: float rounding for the modelled
  optimizers (SGD, Adam, AdamW, with maximize / amsgrad / Nesterov / dampening), the whole update
  for any other optimizer or for param groups with different hyper-parameters. Never dropped.

The optimizers are modelled in `optim_models` (one class each, registered by torch class name);
this module only replays them.

The state (momentum buffers, exp_avg, exp_avg_sq, step counts) is replayed in float64 from the
nearest keyframe with the stored gradients and kept, so consecutive steps cost one replay step
each. Each replayed step also logs how its gradient enters the buffer, so that the momentum part
of a later step can be traced back to the gradients of earlier steps (`UpdateSplit.backflow`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from chisel.attribution.optim_models import (
    GRADIENT,
    MOMENTUM,
    PARTS,
    RESIDUAL,
    WEIGHT_DECAY,
    Coef,
    OptimizerModel,
    model_for,
    state_from_keyframe,
)
from chisel.capture.step_record import StepRecord
from chisel.errors import ChiselError
from chisel.store.layout import read_meta
from chisel.store.reader import Run

Params = dict[str, Tensor]


class ReplayError(ChiselError, ValueError):
    """The optimizer state cannot be replayed for the requested step."""


@dataclass
class _Log:
    """How step `step`'s gradient entered each param's buffer: buf ← decay·buf + inject·g."""

    step: int
    decay: dict[str, float] = field(default_factory=dict)
    inject: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateSplit:
    """The exact split of the update of step `step`.

    parts[part][param] has the param's shape; Σ over parts == update (residual closes it).
    kappa[param]: the factor on this step's gradient (param shape or a number), for params the
    optimizer stepped. carry[param]: the factor on the buffer before this step (momentum part =
    carry ⊙ buf_{t−1}). backflow[param]: (s, ω, decay) newest first, buf_{t−1} = Σ_s ω·G_s + …,
    where G_s is step s's stored gradient and `decay` the product of the decays since s.
    """

    step: int
    optimizer: str
    update: Params
    parts: dict[str, Params]
    kappa: dict[str, Coef]
    carry: dict[str, Coef]
    backflow: dict[str, list[tuple[int, float, float]]]
    note: str = ""  # why the step is not modelled ("" when it is)

    @property
    def modelled(self) -> bool:
        return not self.note


def step_model(run: Run, t: int) -> tuple[OptimizerModel | None, Any, str]:
    """The step's optimizer model and hyper-parameters, or (None, None, why) when the split does
    not model it."""
    cls = run.manifest.get("optimizer", {}).get("class", "?")
    model, note = model_for(cls)
    if model is None:
        return None, None, note
    groups = list(run.record(t).groups)
    if not groups:
        return None, None, "the step record has no param groups"
    algebra = [{k: g.get(k) for k in model.algebra} for g in groups]
    if any(a != algebra[0] for a in algebra[1:]):
        return None, None, "param groups differ in hyper-parameters and the param→group map is not stored"
    if not isinstance(groups[0].get("lr"), (int, float)):
        return None, None, f"lr {groups[0].get('lr')!r} is not a number"
    return model, model.hyper(cls, groups[0]), ""


# -- the replay --------------------------------------------------------------------------------
class OptimizerReplay:
    """The optimizer state of a recorded run, replayed in float64 and kept between calls.

    `split(t)` for t, t+1, … costs one replay step each; a jump (or a step backwards) restarts
    from the latest state point (a keyframe, or any step with optim_state="every_step") at or
    before `t − history`, so the back-flow log covers `history` earlier steps. Passing a step of
    a keyframe reloads its stored state (exact in the param dtype); a keyframe that is not
    periodic (resume, external change) also cuts the back-flow log.
    """

    def __init__(self, run: Run, *, history: int = 50) -> None:
        if history < 0:
            raise ReplayError(f"history={history} must be >= 0 (steps of back-flow log kept).")
        self.run = run
        self.history = history
        self.optimizer = run.manifest.get("optimizer", {}).get("class", "?")
        self._next: int | None = None  # self._state is the state before this step
        self._loaded_at: int | None = None
        self._every_step = run.manifest["config"].get("optim_state") == "every_step"
        self._state: dict[str, dict[str, Any]] | None = None  # None: unknown until a keyframe
        self._log: deque[_Log] = deque(maxlen=history + 1)  # steps before t, and t
        self._keyframes = set(run.keyframes)
        self.replayed = 0  # optimizer steps replayed so far (for tests of the caching)

    def __repr__(self) -> str:
        return f"OptimizerReplay({self.optimizer}, at step {self._next}, history={self.history})"

    def split(self, t: int) -> UpdateSplit:
        """The exact split of Δθ_t (raises SkippedStepError for a skipped step)."""
        update = self.run.update(t)  # validates t, raises for skipped steps
        self._seek(t)
        return self._apply(t, update)

    # -- positioning -----------------------------------------------------------------------
    def replay_from(self, origin: int, until: int) -> None:
        """Load the state stored before step `origin` (cutting the back-flow log), then replay
        up to the state before step `until`: how `split` would stand there had it started at
        `origin` (the Ray engine brings each task's replay to the serial engine's state so)."""
        self._load(origin, cut=True)
        while self._next < until:
            self._apply(self._next, None)

    @property
    def state_points(self) -> list[int]:
        """The steps before which the optimizer state is stored (keyframes)."""
        return sorted(self._keyframes)

    def start_point(self, t: int) -> int:
        """The latest step at or before `t` whose optimizer state is stored (where a replay of
        step t starts)."""
        points = [k for k in self._keyframes if k <= t]
        if self._every_step:
            points.append(t)
        if not points:
            raise ReplayError(
                f"{self.run.path}: no stored optimizer state at or before step {t} "
                f"(keyframes: {sorted(self._keyframes)[:20]}); the run is damaged."
            )
        return max(points)

    def _seek(self, t: int) -> None:
        start = self.start_point(max(t - self.history, 0))
        if self._next is None or not start <= self._next <= t:  # else advancing is no dearer
            self._load(start, cut=True)
        while self._next < t:
            self._apply(self._next, None)

    def _load(self, k: int, *, cut: bool) -> None:
        raw = self.run.optimizer_state(k)
        model, _ = model_for(self.optimizer)
        self._state = {n: state_from_keyframe(model, raw.get(n, {})) for n in self.run.param_names}
        self._next = self._loaded_at = k
        if cut:
            self._log.clear()

    def _reload_at_keyframe(self, s: int) -> None:
        if s == self._loaded_at:
            return
        if s not in self._keyframes:
            if self._state is None and self._every_step:
                self._load(s, cut=True)
            return
        reason = read_meta(self.run.layout.keyframe_file(s), s, "keyframe").get("reason")
        self._load(s, cut=reason != "periodic")

    # -- one step --------------------------------------------------------------------------
    def _apply(self, s: int, update: Params | None) -> UpdateSplit | None:
        """Advance the state over step s; with `update` given, also return its split."""
        self._reload_at_keyframe(s)
        record = self.run.record(s)
        log = _Log(s)
        self._log.append(log)
        self._next = s + 1
        self.replayed += 1
        if record.skipped:
            return None  # the optimizer did not step: state unchanged, nothing decays
        model, hyper, note = step_model(self.run, s)
        if model is not None and self._state is None:
            note = (
                "the optimizer state is unknown after an unmodelled step (until the next keyframe)"
            )
        if model is not None and not note:
            note = self._count_note(model, hyper, record)
        if note:
            self._state = None
            self._log.clear()
            return None if update is None else self._unmodelled(s, update, note)
        assert self._state is not None and model is not None
        grads = self.run.grads(s)
        theta = self.run.params(s) if model.needs_theta(hyper) else {}
        missing = set(record.grad_missing)
        parts: dict[str, Params] = {p: {} for p in PARTS}
        kappa: dict[str, Coef] = {}
        carry: dict[str, Coef] = {}
        for name in self.run.param_names:
            if name in missing:  # torch skips a param whose .grad is None
                for p in (WEIGHT_DECAY, MOMENTUM, GRADIENT):
                    parts[p][name] = torch.zeros_like(grads[name], dtype=torch.float64)
                continue
            th = theta[name].double() if name in theta else None
            out = model.step(hyper, th, grads[name].double(), self._state[name])
            for p in (WEIGHT_DECAY, MOMENTUM, GRADIENT):
                parts[p][name] = out.parts[p]
            kappa[name], carry[name] = out.kappa, out.carry
            log.decay[name], log.inject[name] = out.decay, out.inject
        if update is None:
            return None
        parts[RESIDUAL] = {n: update[n] - sum(parts[p][n] for p in PARTS[:3]) for n in update}
        backflow = {n: self._backflow(n, s) for n in kappa}
        return UpdateSplit(s, self.optimizer, update, parts, kappa, carry, backflow)

    def _count_note(self, model: OptimizerModel, hyper: Any, record: StepRecord) -> str:
        """The replayed state must agree with the record where it says (e.g. Adam's step count)."""
        first = self.run.param_names[0]
        if self._state is None or first in set(record.grad_missing):
            return ""
        return model.count_note(hyper, self._state[first], (record.groups or ({},))[0])

    def _backflow(self, name: str, t: int) -> list[tuple[int, float, float]]:
        """(s, ω, decay since s) newest first: the weight of G_s in the buffer before step t."""
        out, prod = [], 1.0
        for entry in reversed(self._log):
            if entry.step >= t:
                continue
            if name in entry.inject:
                if entry.inject[name]:
                    out.append((entry.step, entry.inject[name] * prod, prod))
                prod *= entry.decay[name]
            if prod == 0.0:
                break
        return out

    def _unmodelled(self, s: int, update: Params, note: str) -> UpdateSplit:
        zero = {n: torch.zeros_like(v) for n, v in update.items()}
        parts = {
            WEIGHT_DECAY: zero,
            MOMENTUM: dict(zero),
            GRADIENT: dict(zero),
            RESIDUAL: dict(update),
        }
        return UpdateSplit(s, self.optimizer, update, parts, {}, {}, {}, note=note)


def split_update(run: Run, t: int, replay: OptimizerReplay | None = None) -> UpdateSplit:
    """The exact split of Δθ_t into weight decay, momentum, gradient and residual.

    Pass the same `replay` for consecutive steps to keep the replayed state.
    """
    replay = replay if replay is not None else OptimizerReplay(run)
    if replay.run is not run:
        raise ReplayError("this OptimizerReplay belongs to another run; make one per run.")
    return replay.split(t)
