"""Compact recording: per-step updates as low-rank factors with error feedback.

Each weight of ≥ 2 dimensions (viewed as a matrix [shape[0], rest]) whose rank-r factors take at
most a quarter of its size is stored per step as U·diag(s)·Vᵀ, a rank-r approximation of its
update: of Δθ_t = θ_{t+1} − θ_t (default), or, with `Compact(feedback=True)`, of
D_t = θ_{t+1} − θ̂_t, where θ̂_t (float64) is exactly what the reader rebuilds (the last keyframe
plus the stored products since), so that what the factors missed is carried into the next step.
Every other parameter is stored exactly (θ after the step, in its own dtype). The encoder
measures, in float64, per step: ‖Δθ_t − U·diag(s)·Vᵀ‖, ‖θ_t − θ̂_t‖ and ‖θ_{t+1} − θ̂_{t+1}‖, and
stores them in the step record; the reader (compact_read.py) spreads each closed keyframe
interval's residual over its steps.

Layout of a step file (fixed by the manifest's params and `Compact.rank`, see `plan`):
  compact/factors   one vector in the factor dtype: U [m, r] then V [n, r] of each low-rank param
  compact/scales    float32: s [r] of each low-rank param
  compact/exact/<dtype>   θ after the step of the exactly stored params of that dtype
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chisel import _names as N
from chisel.capture.config import Compact, torch_dtype

PREFIX = N.COMPACT
FACTORS = "factors"  # keys under PREFIX
SCALES = "scales"
EXACT = "exact/"
LOWRANK_ENCODING = N.LOWRANK  # manifest encodings of a compact run's params
EXACT_ENCODING = N.COMPACT_EXACT
# the step record's field: {"update_error", "error_before", "error_after", "update_errors": {param}}
RECORD_FIELD = "compact"
KEYFRAME_CONTINUES = "continues"  # keyframe meta: θ there is θ after the previous step, bit for bit


@dataclass(frozen=True)
class Entry:
    """Where one parameter lives in a compact step file."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    lowrank: bool
    rows: int = 0  # m, n, r of the matrix view (low-rank params only)
    cols: int = 0
    rank: int = 0
    offset: int = 0  # into compact/factors (U at offset, V at offset + m·r) or compact/exact/<dtype>
    scale_offset: int = 0  # into compact/scales


def _factorise(shape: Sequence[int], dtype: str, rank: int) -> tuple[int, int, int] | None:
    """(m, n, r) of a parameter worth storing as rank-r factors, else None."""
    if len(shape) < 2 or not torch_dtype(dtype).is_floating_point:
        return None
    m, n = shape[0], math.prod(shape[1:])
    r = min(rank, m, n)
    return (m, n, r) if r > 0 and 4 * r * (m + n) <= m * n else None


def plan(
    names: Sequence[str], shapes: Sequence[Sequence[int]], dtypes: Sequence[str], options: Compact
) -> list[Entry]:
    """Every parameter's place in a compact step file, in parameter order."""
    out, factor_at, scale_at, exact_at = [], 0, 0, {}
    for name, shape, dtype in zip(names, shapes, dtypes):
        mnr = _factorise(shape, dtype, options.rank)
        if mnr is None:
            out.append(Entry(name, tuple(shape), dtype, False, offset=exact_at.get(dtype, 0)))
            exact_at[dtype] = exact_at.get(dtype, 0) + math.prod(shape)
            continue
        m, n, r = mnr
        out.append(Entry(name, tuple(shape), dtype, True, m, n, r, factor_at, scale_at))
        factor_at += (m + n) * r
        scale_at += r
    return out


def lowrank(
    d: torch.Tensor, rank: int, *, oversample: int, power_iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [m, r], s [r], V [n, r] with U·diag(s)·Vᵀ ≈ d [m, n] (randomised range finder with a
    private generator: the training's RNG is never touched)."""
    m, n = d.shape
    q = min(rank + oversample, m, n)
    omega = torch.randn(n, q, generator=generator, dtype=d.dtype)
    y = d @ omega
    for _ in range(power_iters):
        y = torch.linalg.qr(y).Q
        y = d @ (d.T @ y)
    basis = torch.linalg.qr(y).Q  # [m, q]
    u, s, vh = torch.linalg.svd(basis.T @ d, full_matrices=False)
    return basis @ u[:, :rank], s[:rank], vh[:rank].T


def product(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U·diag(s)·Vᵀ in float64 from the stored factors: the writer and the reader both use this."""
    return (u.double() * s.double()) @ v.double().T


def unpack(entries: list[Entry], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """{param: (U, s, V) or θ after the step (shaped)} from a compact step file's tensors
    (keys without PREFIX)."""
    factors, scales = tensors.get(FACTORS), tensors.get(SCALES)
    out: dict[str, Any] = {}
    for e in entries:
        if e.lowrank:
            u = factors[e.offset : e.offset + e.rows * e.rank].view(e.rows, e.rank)
            at = e.offset + e.rows * e.rank
            v = factors[at : at + e.cols * e.rank].view(e.cols, e.rank)
            out[e.name] = (u, scales[e.scale_offset : e.scale_offset + e.rank], v)
        else:
            flat = tensors[EXACT + e.dtype]
            out[e.name] = flat[e.offset : e.offset + math.prod(e.shape)].view(e.shape)
    return out


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.reshape(-1), dtype=torch.float64))


class CompactEncoder:
    """The writer's side: holds θ̂ (float64) of the low-rank params, encodes one step at a time."""

    def __init__(self, entries: list[Entry], options: Compact) -> None:
        self.entries = entries
        self.options = options
        self._factor_dtype = torch_dtype(options.factor_dtype)
        self._recon: dict[str, torch.Tensor] = {}  # θ̂ [m, n] float64 per low-rank param
        self._generator = torch.Generator()

    @property
    def encodings(self) -> dict[str, str]:
        return {e.name: LOWRANK_ENCODING if e.lowrank else EXACT_ENCODING for e in self.entries}

    def reset(self, params: dict[str, torch.Tensor], previous: dict[str, torch.Tensor] | None) -> bool:
        """θ̂ ← an exact keyframe's θ. True when that θ is `previous` (θ after the last step)
        bit for bit, so the reader may end the last step there (its update absorbs θ_t − θ̂_t)."""
        continues = previous is not None
        for e in self.entries:
            if continues and not torch.equal(params[e.name], previous[e.name]):
                continues = False
            if e.lowrank:
                value = params[e.name].reshape(e.rows, e.cols)
                if e.name in self._recon:
                    self._recon[e.name].copy_(value)
                else:
                    self._recon[e.name] = value.to("cpu", torch.float64, copy=True)
        return continues

    def encode(
        self, step: int, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (keys with PREFIX) and the record field of the step θ_t = `before` →
        θ_{t+1} = `after` ({param: tensor}, CPU)."""
        o = self.options
        factors, scales, exact = [], [], {}
        err_update, err_before, err_after = {}, 0.0, 0.0
        for i, e in enumerate(self.entries):
            if not e.lowrank:
                exact.setdefault(e.dtype, []).append(after[e.name].reshape(-1))
                continue
            new = after[e.name].reshape(e.rows, e.cols).double()
            old = before[e.name].reshape(e.rows, e.cols).double()
            recon = self._recon[e.name]
            delta = new - old
            d = new - recon if o.feedback else delta
            self._generator.manual_seed(step * 1_000_003 + i)
            u, s, v = lowrank(
                d.float(), e.rank, oversample=o.oversample, power_iters=o.power_iters,
                generator=self._generator,
            )
            u, s, v = u.to(self._factor_dtype), s.float(), v.to(self._factor_dtype)
            stored = product(u, s, v)
            err_before += _norm(old - recon) ** 2
            recon += stored
            err_after += _norm(new - recon) ** 2
            err_update[e.name] = _norm(delta - stored)
            factors += [u.reshape(-1), v.reshape(-1)]
            scales.append(s)
        tensors = {PREFIX + EXACT + d: torch.cat(v) for d, v in exact.items()}
        if factors:
            tensors[PREFIX + FACTORS] = torch.cat(factors)
            tensors[PREFIX + SCALES] = torch.cat(scales)
        field = {
            "update_error": math.sqrt(sum(x * x for x in err_update.values())),
            "error_before": math.sqrt(err_before),
            "error_after": math.sqrt(err_after),
            "update_errors": err_update,
        }
        return tensors, field
