"""Reading an FSDP2 run: every rank's sub-run of its shards, reassembled into full parameters.

Under FSDP2 (`fully_shard`) each rank holds a dim-0 piece of every parameter, of its gradient
and of its optimizer state. chisel records each rank's pieces as a complete run of their own in
`<run>/ranks/<r>/` (θ, updates, gradients, keyframes, tags), and rank 0 writes the run's
manifest with the full shapes and how each parameter is cut (`distributed.sharded`). A
`ShardedRun` (what `chisel.load` returns for such a run) reads the ranks' sub-runs and joins
the pieces with `reassemble`: `params(t)`, `update(t)`, `grads(t)` and `optimizer_state(t)` are
the full tensors, as an unsharded run of the same training would give them.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from chisel.errors import StepOutOfRangeError
from chisel.store.index import as_step
from chisel.store.shards import (
    DISTRIBUTED,
    merge_factors,
    merge_tags,
    reassemble,
    samples,
    shard_layout,
)

Tensors = dict[str, torch.Tensor]


class ShardedRunMixin:
    """An FSDP2 run read as one run: the ranks' sub-runs (`ranks`) joined parameter by parameter.

    The methods of `chisel.store.reader.ShardedRun`, which mixes them into `Run` (so a sharded
    run is a `Run` wherever one is expected); `plain` is `Run` itself, which opens each rank's
    sub-run, and `row` the steps table's row maker."""

    plain: Any
    row: Any
    path: Path
    manifest: dict[str, Any]
    param_names: list[str]
    world_size: int

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        super().__init__(path, verify=verify)  # type: ignore[call-arg]  # Run: the run's manifest
        self.specs: dict[str, dict[str, Any]] = self.manifest[DISTRIBUTED]["sharded"]
        self.ranks = [self.plain(shard_layout(self.path, r).root, verify=verify) for r in range(self.world_size)]
        self.layout = self.ranks[0].layout  # keyframe files (their reasons): rank 0's

    def __repr__(self) -> str:
        return (f"ShardedRun({str(self.path)!r}, steps={len(self)}, params={len(self.param_names)}, "
                f"ranks={self.world_size})")

    def __len__(self) -> int:
        """Steps every rank has written (a rank behind the others bounds the run)."""
        return min(len(r) for r in self.ranks)

    def _check(self, t: Any, *, allow_end: bool = False) -> int:
        t = as_step(t, "θ index" if allow_end else "step")
        n = len(self)
        hi = n if allow_end else n - 1
        if not 0 <= t <= hi:
            raise StepOutOfRangeError(
                f"step {t} is outside this run: every rank has written {n} complete steps "
                f"(valid: 0..{hi}). A run still being written grows; reload `len(run)`."
            )
        return t

    def _join(self, pieces: list[Tensors]) -> Tensors:
        return {n: reassemble([p[n] for p in pieces], self.specs[n], n) for n in self.param_names}

    @property
    def keyframes(self) -> list[int]:
        """Keyframe steps (every rank writes its pieces at the same steps)."""
        return self.ranks[0].keyframes


    def params(self, t: int) -> Tensors:
        """θ before step t, full parameters."""
        t = self._check(t, allow_end=True)
        return self._join([r.params(t) for r in self.ranks])

    def update(self, t: int) -> Tensors:
        """Δθ_t of the full parameters (float64)."""
        t = self._check(t)
        return self._join([r.update(t) for r in self.ranks])

    def grads(self, t: int) -> Tensors:
        """The full gradient the optimizer consumed (FSDP2's reduce-scattered mean, joined)."""
        t = self._check(t)
        return self._join([r.grads(t) for r in self.ranks])

    def optimizer_state(self, t: int) -> dict[str, Tensors]:
        """{param: {key: tensor}}: per-element state joined like its parameter; scalars (the
        step count) from rank 0."""
        states = [r.optimizer_state(t) for r in self.ranks]
        out: dict[str, Tensors] = {}
        for name, keys in states[0].items():
            out[name] = {
                key: value if value.ndim == 0
                else reassemble([s[name][key] for s in states], self.specs[name], f"{key}/{name}")
                for key, value in keys.items()
            }
        return out

    def record(self, t: int) -> Any:
        """Rank 0's record of step t with the norms of the full update and gradient, and the
        global batch sizes."""
        t = self._check(t)
        records = [r.record(t) for r in self.ranks]
        first = records[0]

        def total(values: list[float | None]) -> float | None:
            return None if any(v is None for v in values) else math.sqrt(sum(v * v for v in values))  # type: ignore[operator]

        norms = {n: total([r.update_norms.get(n) for r in records]) for n in first.update_norms}
        return replace(
            first,
            update_norm=total([r.update_norm for r in records]),
            update_norms=norms,
            grad_norm=total([r.grad_norm for r in records]),
            batch_sizes=tuple(sum(b) for b in zip(*(r.batch_sizes for r in records))),
        )

    @property
    def steps(self) -> Any:
        import pandas as pd

        return pd.DataFrame([type(self).row(self.record(t)) for t in range(len(self))])

    def tags(self, t: int) -> dict[str, Any]:
        """Every rank's tags, in rank order (see `merge_tags`)."""
        t = self._check(t)
        parts = []
        for r in self.ranks:
            tags = r.tags(t)
            parts.append((tags, samples(r.record(t).batch_sizes, tags)))
        return merge_tags(parts, t)

    def factors(self, t: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every rank's per-sample factors, in rank order (each rank's g_i scaled by 1/R, so all
        ranks' terms sum to the joined gradient, times `record(t).grad_coef`)."""
        t = self._check(t)
        return merge_factors([r.factors(t) for r in self.ranks], t)
