"""The reader's side of compact recording (`chisel.Compact`): θ̂ and Δ̂θ from keyframes and
low-rank factors, and the stated error of each.

θ̂_t is the keyframe at or before t plus the stored products since, summed in float64 in step
order: exactly the writer's θ̂ (the same operations on the same values). At a keyframe θ̂ is the
keyframe itself. The last step before a keyframe that continues it (θ there is θ after that step,
bit for bit: a periodic or final keyframe with no change made outside `step()`) ends at the
keyframe: its update is keyframe − θ̂_t, so Σ updates over a keyframe interval is the exact
difference of the two keyframes, and that step's error is ‖θ_t − θ̂_t‖ instead of the product's.
"""

from __future__ import annotations

from typing import Any

import torch

from chisel.capture.config import Compact
from chisel.errors import ChiselError
from chisel.store import compact as C
from chisel.store.layout import read_meta

Tensors = dict[str, torch.Tensor]


def is_compact(manifest: dict[str, Any]) -> bool:
    return bool(manifest.get("config", {}).get("compact"))


def _field(record: Any) -> dict[str, Any]:
    value = record.get(C.RECORD_FIELD) if isinstance(record, dict) else getattr(record, C.RECORD_FIELD, None)
    return value or {}


def _skipped(record: Any) -> bool:
    return bool(record.get("skipped") if isinstance(record, dict) else record.skipped)


class CompactReader:
    """Decodes the steps of one compact `Run` (which calls it from `params` and `update`)."""

    def __init__(self, run: Any) -> None:  # a chisel.Run (not imported: reader imports this)
        self.run = run
        options = Compact(**run.manifest["config"]["compact"])
        m = run.manifest["params"]
        self.entries = C.plan([p["name"] for p in m], [p["shape"] for p in m], [p["dtype"] for p in m], options)
        self._cache: tuple[int, Tensors] | None = None  # (t, θ̂_t of the low-rank params)

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
        """θ̂_t [m, n] float64 of every low-rank param."""
        start = self._start(t)
        cached = self._cache
        if cached is not None and start <= cached[0] <= t:
            s, recon = cached[0], {n: v.clone() for n, v in cached[1].items()}
        else:
            kf = self.run._keyframe_params(start, [e.name for e in self.entries if e.lowrank])
            s = start
            recon = {e.name: kf[e.name].reshape(e.rows, e.cols).double() for e in self.entries if e.lowrank}
        while s < t:
            if not _skipped(self.run.record(s)):
                parts = self._parts(s)
                for n in recon:
                    recon[n] += C.product(*parts[n])
            s += 1
        self._cache = (t, {n: v.clone() for n, v in recon.items()})
        return recon

    def _exact(self, t: int) -> Tensors:
        """θ_t of the exactly stored params: the last step before t since its keyframe, or it."""
        start, names = self._start(t), [e.name for e in self.entries if not e.lowrank]
        for s in range(t - 1, start - 1, -1):
            if not _skipped(self.run.record(s)):
                parts = self._parts(s)
                return {n: parts[n] for n in names}
        return self.run._keyframe_params(start, names) if names else {}

    def snapped(self, t: int) -> int | None:
        """The keyframe step t ends at (see the module's docstring), or None."""
        later = [k for k in self.run.keyframes if k > t]
        if not later:
            return None
        k = min(later)
        if any(not _skipped(self.run.record(s)) for s in range(t + 1, min(k, len(self.run)))):
            return None
        meta = read_meta(self.run.layout.keyframe_file(k), k, "keyframe", verify=self.run.verify)
        return k if meta.get(C.KEYFRAME_CONTINUES) else None

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
        """θ̂_t of the low-rank params in float64, shaped: θ̂_{t+1} − θ̂_t = update(t) exactly
        (at a keyframe θ̂ is the keyframe)."""
        low = self._lowrank(t)
        return {e.name: low[e.name].reshape(e.shape) for e in self.entries if e.lowrank}

    def update(self, t: int) -> Tensors:
        """Δ̂θ_t per parameter in float64: the stored product, or keyframe − θ̂_t at a step that
        ends at a keyframe; exactly θ_{t+1} − θ_t for the exactly stored params."""
        parts = self._parts(t)
        before = self._exact(t)
        k = self.snapped(t)
        if k is not None:
            kf = self.run._keyframe_params(k, [e.name for e in self.entries if e.lowrank])
            recon = self._lowrank(t)
        out: Tensors = {}
        for e in self.entries:
            if not e.lowrank:
                out[e.name] = parts[e.name].double() - before[e.name].double()
            elif k is not None:
                out[e.name] = (kf[e.name].reshape(e.rows, e.cols).double() - recon[e.name]).reshape(e.shape)
            else:
                out[e.name] = C.product(*parts[e.name]).reshape(e.shape)
        return out

    def update_error(self, t: int) -> float:
        """‖run.update(t) − Δθ_t‖ over all parameters, as the writer measured it in float64."""
        field = _field(self.run.record(t))
        return float(field["error_before"] if self.snapped(t) is not None else field["update_error"])

    def params_error(self, t: int) -> float:
        """‖run.params(t) − θ_t‖ in float64 (0 at a keyframe) as the writer measured it."""
        start = self._start(t)
        for s in range(t - 1, start - 1, -1):
            record = self.run.record(s)
            if not _skipped(record):
                return float(_field(record)["error_after"])
        return 0.0
