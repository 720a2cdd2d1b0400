"""The reader's side of compact recording (`chisel.Compact`): θ̂ and Δ̂θ from keyframes and
low-rank factors, and a bound on the error of each.

θ̂_t is the keyframe at or before t plus the stored products since, summed in float64 in step
order: exactly the writer's θ̂. At a keyframe θ̂ is the keyframe itself. A keyframe interval
[k, k') is *closed* once keyframe k' exists and continues its last step (θ there is θ after that
step, bit for bit: a periodic or final keyframe with no change made outside `step()`; the writer
marks it). Then the residual r = θ_{k'} − θ̂_{k'} (what the products missed, float64) is spread
over the interval's steps in proportion to their true ‖Δθ_t‖ (in the records): update(t) is the
product plus w_t·r and θ̂_t gains c_t·r, c_t = Σ_{s<t} w_s. The interval's updates then sum to the
exact difference of its keyframes, and each step's error is bounded by the writer's measured
error plus its share of ‖r‖. In an open interval (the run's last, while recording or after a
kill) the updates are the products and the errors the measured ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from chisel.capture.config import Compact
from chisel.errors import ChiselError
from chisel.store import compact as C
from chisel.store.layout import read_meta

Tensors = dict[str, torch.Tensor]


def is_compact(manifest: dict[str, Any]) -> bool:
    return bool(manifest.get("config", {}).get("compact"))


@dataclass(frozen=True)
class Spread:
    """A closed keyframe interval [start, end): the residual r = θ_end − θ̂_end [m, n] per low-rank
    param (what the stored products missed, known once the exact keyframe θ_end is there) and each
    step's share w_t of it, proportional to the step's true ‖Δθ_t‖ (stored by the writer)."""

    start: int
    end: int
    weights: list[float]
    residual: dict[str, torch.Tensor]
    size: float  # ‖r‖ over all params, float64


class CompactReader:
    """Decodes the steps of one compact `Run` (which calls it from `params` and `update`)."""

    def __init__(self, run: Any) -> None:  # a chisel.Run (not imported: reader imports this)
        self.run = run
        options = Compact(**run.manifest["config"]["compact"])
        m = run.manifest["params"]
        self.entries = C.plan([p["name"] for p in m], [p["shape"] for p in m], [p["dtype"] for p in m], options)
        self._cache: tuple[int, int, Tensors] | None = None  # (keyframe, t, Σ up to t)
        self._spreads: dict[tuple[int, int], Spread | None] = {}

    # -- pieces -------------------------------------------------------------------------------------
    def _parts(self, t: int) -> dict[str, Any]:
        tensors = self.run._step_tensors(t, C.PREFIX)
        try:
            return C.unpack(self.entries, tensors)
        except (KeyError, TypeError, RuntimeError) as err:
            raise ChiselError(
                f"Step {t}: {self.run.layout.step_file(t)} does not hold the compact vectors its "
                f"manifest describes ({err!r}); the file is damaged: restore it or re-record."
            ) from err

    def _start(self, t: int) -> int:
        start = max((k for k in self.run.keyframes if k <= t), default=None)
        if start is None:
            raise ChiselError(f"{self.run.path}: no keyframe at or before step {t}; the run is damaged.")
        return start

    def _lowrank(self, t: int) -> Tensors:
        """θ̂_t [m, n] float64 of every low-rank param: the keyframe plus the stored products."""
        return self._sum(self._start(t), t)

    def _sum(self, start: int, t: int) -> Tensors:
        """Keyframe `start` plus the stored products of steps start … t − 1 (float64, in order)."""
        cached = self._cache
        if cached is not None and cached[0] == start and start <= cached[1] <= t:
            s, recon = cached[1], {n: v.clone() for n, v in cached[2].items()}
        else:
            kf = self.run._keyframe_params(start, [e.name for e in self.entries if e.lowrank])
            s = start
            recon = {e.name: kf[e.name].reshape(e.rows, e.cols).double() for e in self.entries if e.lowrank}
        while s < t:
            if not self.run.record(s).skipped:
                parts = self._parts(s)
                for n in recon:
                    recon[n] += C.product(*parts[n])
            s += 1
        self._cache = (start, t, {n: v.clone() for n, v in recon.items()})
        return recon

    def _exact(self, t: int) -> Tensors:
        """θ_t of the exactly stored params: the last step before t since its keyframe, or it."""
        start, names = self._start(t), [e.name for e in self.entries if not e.lowrank]
        for s in range(t - 1, start - 1, -1):
            if not self.run.record(s).skipped:
                parts = self._parts(s)
                return {n: parts[n] for n in names}
        return self.run._keyframe_params(start, names) if names else {}

    def spread(self, t: int) -> Spread | None:
        """How the closed keyframe interval holding step (or θ index) t ends at its keyframe, or
        None while it is open (no later keyframe, or one that does not continue the last step)."""
        k0 = self._start(t)
        later = [k for k in self.run.keyframes if k > t]
        k1 = min(later) if later else None
        if k1 is None:
            return None
        if (k0, k1) not in self._spreads:
            if k1 > len(self.run):  # keyframe k1 is in place, a step before it not yet
                return None
            meta = read_meta(self.run.layout.keyframe_file(k1), k1, "keyframe", verify=self.run.verify)
            if not meta.get(C.KEYFRAME_CONTINUES):
                self._spreads[(k0, k1)] = None
            else:
                low = [e.name for e in self.entries if e.lowrank]
                kf = self.run._keyframe_params(k1, low)
                end = self._sum(k0, k1)
                shapes = {e.name: (e.rows, e.cols) for e in self.entries}
                r = {n: kf[n].reshape(shapes[n]).double() - end[n] for n in low}
                norms = [
                    0.0 if rec.skipped else float(rec.update_norm or 0.0)
                    for rec in (self.run.record(s) for s in range(k0, k1))
                ]
                total = sum(norms)
                weights = [x / total for x in norms] if total > 0 else [1.0 / (k1 - k0)] * (k1 - k0)
                size = math.sqrt(sum(float(v.square().sum()) for v in r.values()))
                self._spreads[(k0, k1)] = Spread(k0, k1, weights, r, size)
        return self._spreads[(k0, k1)]

    def stored_update(self, t: int) -> Tensors:
        """The update as stored (the product U·diag(s)·Vᵀ; exact for the exactly stored params),
        before any share of the interval's residual: its error is the record's update_error."""
        parts = self._parts(t)
        before = self._exact(t)
        return {
            e.name: C.product(*parts[e.name]).reshape(e.shape) if e.lowrank
            else parts[e.name].double() - before[e.name].double()
            for e in self.entries
        }

    # -- what Run returns ---------------------------------------------------------------------------
    def params(self, t: int) -> Tensors:
        """θ̂_t per parameter: the exactly stored ones in their dtype, the low-rank ones in float64
        (θ̂ is a float64 sum, and casting it would break θ̂_{t+1} − θ̂_t = update(t); at a keyframe
        the float64 values are the keyframe's exactly)."""
        names = [e.name for e in self.entries]
        if t in set(self.run.keyframes):
            kf = self.run._keyframe_params(t, names)
            return {e.name: kf[e.name].double() if e.lowrank else kf[e.name] for e in self.entries}
        out = dict(self._exact(t))
        if any(e.lowrank for e in self.entries):
            out.update(self.params64(t))
        return {n: out[n] for n in names}

    def params64(self, t: int) -> Tensors:
        """θ̂_t of the low-rank params in float64, shaped (at a keyframe, the keyframe); in a closed
        interval plus the share c_t = Σ_{s<t} w_s of its residual r: θ̂_{t+1} − θ̂_t = update(t)."""
        low = self._lowrank(t)
        sp = self.spread(t) if t not in set(self.run.keyframes) else None
        if sp is not None:
            c = sum(sp.weights[: t - sp.start])
            low = {n: v + c * sp.residual[n] for n, v in low.items()}
        return {e.name: low[e.name].reshape(e.shape) for e in self.entries if e.lowrank}

    def update(self, t: int) -> Tensors:
        """Δ̂θ_t per parameter in float64: the stored product, plus, in a closed interval, the
        share w_t of its residual r (so the interval's updates sum to the keyframes' difference);
        exactly θ_{t+1} − θ_t for the exactly stored params."""
        out = self.stored_update(t)
        sp = self.spread(t)
        if sp is not None:
            w = sp.weights[t - sp.start]
            for e in self.entries:
                if e.lowrank:
                    out[e.name] = out[e.name] + w * sp.residual[e.name].reshape(e.shape)
        return out

    def update_error(self, t: int) -> float:
        """A bound on ‖run.update(t) − Δθ_t‖ over all parameters: the writer's measured error of the
        stored product (exact, float64), plus w_t·‖r‖ in a closed interval (triangle inequality)."""
        stored = float((self.run.record(t).compact or {})["update_error"])
        sp = self.spread(t)
        return stored if sp is None else stored + sp.weights[t - sp.start] * sp.size

    def params_error(self, t: int) -> float:
        """A bound on ‖run.params(t) − θ_t‖ (0 at a keyframe): the writer's measured ‖θ_t − θ̂_t‖,
        plus c_t·‖r‖ in a closed interval."""
        if t in set(self.run.keyframes):
            return 0.0
        start, measured = self._start(t), 0.0
        for s in range(t - 1, start - 1, -1):
            record = self.run.record(s)
            if not record.skipped:
                measured = float((record.compact or {})["error_after"])
                break
        sp = self.spread(t)
        return measured if sp is None else measured + sum(sp.weights[: t - sp.start]) * sp.size
