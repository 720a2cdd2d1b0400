"""`chisel.load`: read a run directory, during the run, after it, or after a crash.

Nothing here unpickles: manifests are JSON, tensors are safetensors.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from chisel import _names as N
from chisel.capture.buffers import FlatLayout
from chisel.capture.config import torch_dtype
from chisel.capture.step_record import StepRecord
from chisel.errors import (
    ChiselError,
    CorruptStepError,
    MissingStepsWarning,
    NotARunError,
    SkippedStepError,
    StepOutOfRangeError,
    UnverifiedRunWarning,
)
from chisel.store.compact_read import CompactReader, is_compact
from chisel.store.index import as_step, gap_message, visible_steps
from chisel.store.layout import RunLayout, read_manifest, read_meta, read_tensors
from chisel.store.manifest import check_keyframe_shapes, check_manifest, record_problems
from chisel.store.shards import (
    concat_pairs,
    global_samples,
    is_sharded_run,
    merge_factors,
    merge_tags,
    read_shard,
    samples,
    shard_layout,
    world_size,
)
from chisel.store.shards_run import ShardedRunMixin

if TYPE_CHECKING:
    import pandas as pd

Tensors = dict[str, torch.Tensor]


def complete_steps(layout: RunLayout) -> int:
    """Number of visible steps 0, 1, 2, … without a gap (a step file is renamed in last)."""
    return visible_steps(layout)[0]


@dataclass(frozen=True)
class Step:
    """One recorded optimizer step of a `Run`; tensors are read on demand."""

    run: Run
    index: int

    @property
    def record(self) -> StepRecord:
        return self.run.record(self.index)

    @property
    def skipped(self) -> bool:
        return self.record.skipped

    def update(self) -> Tensors:
        return self.run.update(self.index)

    def params(self) -> Tensors:
        return self.run.params(self.index)

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.run.factors(self.index)

    def tags(self) -> dict[str, Any]:
        return self.run.tags(self.index)


class Run:
    """A recorded training run. `run.params(t)` is θ before step t; `run.update(t)` is Δθ_t."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise NotARunError(f"run_dir must be a path (str or Path), not {type(path).__name__}.")
        self.path = Path(path)
        self.layout = RunLayout(self.path)
        self.manifest = check_manifest(read_manifest(self.path), self.layout.manifest)
        version = self.manifest["format_version"]
        self.verify = verify  # check every step/keyframe tensor and record against its CRC32
        self._require_sums = verify and version >= N.CHECKSUMS_SINCE
        if verify and not self._require_sums:
            warnings.warn(
                f"{self.path} has format_version {version}, written before chisel stored "
                "checksums: its files are read without verification.",
                UnverifiedRunWarning,
                stacklevel=3,
            )
        self._gap_warned = False
        self.param_names = [p["name"] for p in self.manifest["params"]]
        self._dtypes = {p["name"]: torch_dtype(p["dtype"]) for p in self.manifest["params"]}
        self._encodings = {p["name"]: p["encoding"] for p in self.manifest["params"]}
        self.flat = FlatLayout.build(
            self.param_names,
            [p["shape"] for p in self.manifest["params"]],
            [p["dtype"] for p in self.manifest["params"]],
        )
        self._record = lru_cache(maxsize=4096)(self._read_record)
        self._lossy_cache: tuple[int, Tensors] | None = None
        self.world_size = world_size(self.manifest)  # ranks whose samples the run holds (DDP)
        check_keyframe_shapes(self.manifest, self.layout)
        self._compact = CompactReader(self) if is_compact(self.manifest) else None

    # -- index ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        n, later = visible_steps(self.layout)
        if later and not self._gap_warned:
            self._gap_warned = True
            warnings.warn(gap_message(self.path, n, later), MissingStepsWarning, stacklevel=2)
        return n

    def __iter__(self) -> Iterator[Step]:
        for t in range(len(self)):
            yield Step(self, t)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={len(self)}, params={len(self.param_names)})"

    def _check_step(self, t: int, *, allow_end: bool = False) -> int:
        what = "θ index" if allow_end else "step"
        t = as_step(t, what)
        n, later = visible_steps(self.layout)
        hi = n if allow_end else n - 1
        if not 0 <= t <= hi:
            gap = f" {gap_message(self.path, n, later)}" if later and t >= n else ""
            raise StepOutOfRangeError(
                f"{what} {t} is outside this run: it has {n} complete steps "
                f"(valid: 0..{hi}). A run still being written grows; reload `len(run)`.{gap}"
            )
        return t

    @property
    def keyframes(self) -> list[int]:
        return self.layout.numbers(N.KEYFRAMES_DIR)

    # -- records --------------------------------------------------------------------------------
    def _read_record(self, t: int) -> StepRecord:
        path = self.layout.step_file(t)
        record = read_meta(path, t, "step", verify=self.verify)
        problems = record_problems(record, t)
        if problems:
            raise CorruptStepError(
                f"The record of step {t} in {path} is damaged: {'; '.join(problems[:3])}. "
                "Restore the file or re-record; `chisel verify RUN_DIR` lists every problem."
            )
        return StepRecord.from_json(record)

    def record(self, t: int) -> StepRecord:
        """The metadata of step t (lr, norms, optimizer hyper-parameters, tags, …)."""
        return self._record(self._check_step(t))

    @property
    def steps(self) -> pd.DataFrame:
        """One row per step: step, time, skipped, lr, grad_norm, update_norm, clip_coef, …"""
        import pandas as pd  # on use: recording and `import chisel` do not need pandas

        rows = []
        for t in range(len(self)):
            try:
                row = _row(self.record(t))
                if self.world_size > 1:  # DDP: every rank's samples, not rank 0's alone
                    row["n_samples"] = global_samples(
                        self.path, t, self.world_size, row["n_samples"], verify=self.verify
                    )
                rows.append(row)
            except CorruptStepError as err:
                warnings.warn(str(err), stacklevel=2)
                rows.append({"step": t, "error": str(err)})
        return pd.DataFrame(rows)

    # -- tensors --------------------------------------------------------------------------------
    def _step_tensors(self, t: int, prefix: str) -> Tensors:
        return read_tensors(
            self.layout.step_file(t), t, "step", prefix, verify=self.verify, require=self._require_sums
        )

    def _flat(self, t: int, prefix: str, names: list[str] | None = None) -> Tensors:
        """Per-parameter views of the flat per-dtype vectors stored under `prefix` (of `names`,
        each of which must be there; default: every parameter whose dtype vector is stored)."""
        flats = self._step_tensors(t, prefix)
        layout = self.flat
        for dtype, value in flats.items():
            # the key names the parameters' dtype; deltas and gradients are in the storage dtype
            if layout.sizes.get(dtype) != value.numel() or value.dim() != 1:
                raise CorruptStepError(
                    f"Step {t}: {prefix}{dtype} in {self.layout.step_file(t)} holds "
                    f"{value.numel()} values; the manifest's layout says "
                    f"{layout.sizes.get(dtype)}. The step file or the manifest was "
                    "damaged: restore it or re-record; `chisel verify RUN_DIR` lists every problem."
                )
        out = layout.split(flats)
        missing = [n for n in names or [] if n not in out]
        if missing:
            raise CorruptStepError(
                f"Step {t}: {self.layout.step_file(t)} has no {prefix}… vector for {missing[:3]}; "
                "the file is damaged: restore it or re-record."
            )
        return out

    def _keyframe(self, t: int, prefix: str = N.PARAM) -> Tensors:
        return read_tensors(
            self.layout.keyframe_file(t), t, "keyframe", prefix, verify=self.verify,
            require=self._require_sums,
        )

    def _keyframe_params(self, t: int, names: list[str]) -> Tensors:
        kf = self._keyframe(t)
        shapes = dict(zip(self.flat.names, self.flat.shapes))
        for n in names:
            value = kf.get(n)
            if value is None or tuple(value.shape) != shapes[n]:
                found = "no such tensor" if value is None else f"shape {list(value.shape)}"
                raise CorruptStepError(
                    f"The keyframe before step {t} ({self.layout.keyframe_file(t)}) has {found} "
                    f"for parameter {n!r}, which the manifest lists with shape "
                    f"{list(shapes[n])}. The keyframe or the manifest was damaged: restore it "
                    "or re-record."
                )
        return {n: kf[n] for n in names}

    def params(self, t: int) -> Tensors:
        """θ before step t, in each parameter's own dtype; `params(len(run))` is the final θ.
        (A compact run gives its low-rank parameters in float64: see `Run.params_error`.)"""
        t = self._check_step(t, allow_end=True)
        if self._compact is not None:
            return self._compact.params(t)
        keyframes = set(self.keyframes)
        exact = [n for n in self.param_names if self._encodings[n] == N.EXACT]
        lossy = [n for n in self.param_names if self._encodings[n] == N.LOSSY]
        out: Tensors = {}
        if exact:
            out.update(self._exact_params(t, keyframes, exact))
        if lossy:
            out.update({n: v.to(self._dtypes[n]) for n, v in self._lossy_params(t, keyframes).items()})
        return {n: out[n] for n in self.param_names}

    def _exact_params(self, t: int, keyframes: set[int], names: list[str]) -> Tensors:
        s = t
        while True:
            if s in keyframes:
                return self._keyframe_params(s, names)
            s -= 1
            if s < 0:
                raise ChiselError(f"{self.path}: no keyframe at or before step {t}; the run is damaged.")
            if not self.record(s).skipped:
                after = self._flat(s, N.AFTER, names)
                return {n: after[n] for n in names}

    def _lossy_params(self, t: int, keyframes: set[int]) -> Tensors:
        """θ̂_t in float64: the last keyframe plus the stored deltas, summed in step order."""
        start = max((k for k in keyframes if k <= t), default=None)
        if start is None:
            raise ChiselError(f"{self.path}: no keyframe at or before step {t}; the run is damaged.")
        cached = self._lossy_cache
        if cached is not None and start <= cached[0] <= t:
            s, recon = cached[0], {n: v.clone() for n, v in cached[1].items()}
        else:
            lossy = [n for n in self._encodings if self._encodings[n] == N.LOSSY]
            kf = self._keyframe_params(start, lossy)
            s, recon = start, {n: kf[n].double() for n in lossy}
        while s < t:
            if not self.record(s).skipped:
                delta = self._flat(s, N.DELTA, list(recon))
                for n in recon:
                    recon[n] += delta[n].double()
            s += 1
        self._lossy_cache = (t, {n: v.clone() for n, v in recon.items()})
        return recon

    def update(self, t: int) -> Tensors:
        """Δθ_t = θ_{t+1} − θ_t per parameter, in float64 (exact for losslessly stored params)."""
        t = self._check_step(t)
        record = self.record(t)
        if record.skipped:
            raise SkippedStepError(
                f"step {t} was skipped ({record.skip_reason}); it has no update. "
                "Filter with `run.steps[~run.steps.skipped]`."
            )
        if self._compact is not None:
            return self._compact.update(t)
        out: Tensors = {}
        exact = [n for n in self.param_names if self._encodings[n] == N.EXACT]
        if exact:  # only the exact params' θ_t: the lossy ones come straight from the delta
            before = self._exact_params(t, set(self.keyframes), exact)
            after = self._flat(t, N.AFTER, exact)
            out.update({n: after[n].double() - before[n].double() for n in exact})
        if len(exact) < len(self.param_names):
            delta = self._flat(t, N.DELTA, [n for n in self.param_names if n not in exact])
            out.update({n: delta[n].double() for n in self.param_names if self._encodings[n] == N.LOSSY})
        return {n: out[n] for n in self.param_names}

    def update_error(self, t: int) -> float:
        """‖run.update(t) − Δθ_t‖ over all parameters (float64): stored per step by a compact
        run (as the writer measured it), 0.0 for a run whose every parameter is stored exactly."""
        t = self._check_step(t)
        if self._compact is not None:
            return self._compact.update_error(t)
        return self._exact_only("update_error")

    def params_error(self, t: int) -> float:
        """‖run.params(t) − θ_t‖ over all parameters (float64): 0.0 at keyframes and for a run
        whose every parameter is stored exactly; stored per step by a compact run."""
        t = self._check_step(t, allow_end=True)
        if self._compact is not None:
            return self._compact.params_error(t)  # 0.0 at a keyframe
        return self._exact_only("params_error")

    def _exact_only(self, what: str) -> float:
        if all(e == N.EXACT for e in self._encodings.values()):
            return 0.0
        raise ChiselError(
            f"run.{what}: this run stores some parameters as {self.manifest['config'].get('dtype')} "
            "deltas, whose error is bounded (docs/run-format.md, precision) but not stored per "
            "step; only exact and compact runs state it."
        )

    def grads(self, t: int) -> Tensors:
        """The gradient the optimizer consumed at step t (after clipping and unscaling)."""
        t = self._check_step(t)
        if not self.manifest["config"].get("grads"):
            raise ChiselError("This run was recorded with grads=False; no gradients are stored.")
        grads = self._flat(t, N.GRAD, self.param_names)
        scale = self.record(t).grads_scaled_by
        return {n: grads[n] / scale if scale else grads[n] for n in self.param_names}

    def optimizer_state(self, t: int) -> dict[str, Tensors]:
        """The optimizer state before step t: {param: {key: tensor}}, from a keyframe at t or,
        with optim_state="every_step", from the step file."""
        t = self._check_step(t, allow_end=True)
        if t in set(self.keyframes):
            flat = self._keyframe(t, N.STATE)
        elif self.manifest["config"].get("optim_state") == "every_step" and t < len(self):
            flat = self._step_tensors(t, N.STATE)
        else:
            raise ChiselError(
                f"No optimizer state is stored before step {t}; keyframes are at {self.keyframes[:20]}"
                " (record with optim_state='every_step' to have it at every step)."
            )
        out: dict[str, Tensors] = {}
        for key, value in flat.items():
            state_key, name = key.split("/", 1)
            out.setdefault(name, {})[state_key] = value
        return out

    def tags(self, t: int) -> dict[str, Any]:
        """Tags attached to step t: scalars as Python values, per-sample tags as 1-D tensors.
        A distributed run's are every rank's, in rank order (see `store.shards.merge_tags`)."""
        t = self._check_step(t)
        record = self.record(t)
        own = _tags_of(record, lambda: self._step_tensors(t, N.TAG), self.layout.step_file(t), t)
        if self.world_size == 1:
            return own
        parts = [(own, samples(record.batch_sizes, own))]
        for rec, arrays, path in self._shards(t, N.TAG):
            tags = _tags_of(rec, lambda arrays=arrays: arrays, path, t)
            parts.append((tags, samples(rec.batch_sizes, tags)))
        return merge_tags(parts, t)

    def factors(self, t: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-sample factors of step t: module → (X [n, ..., in], G [n, ..., out]).

        Several calls of one module are concatenated (flattened to rows of tokens if their
        shapes differ). Conv2d inputs are unfolded: X [n, positions, C·kh·kw], G [n, positions, out].
        A distributed run's samples are every rank's, in rank order.
        """
        t = self._check_step(t)
        record = self.record(t)
        meta = self.manifest.get("factor_modules", {})
        parts = [_factors_of(record, lambda: self._step_tensors(t, N.FACTORS), self.layout.step_file(t), t, meta)]
        if self.world_size > 1 and record.has_factors:
            parts += [
                _factors_of(rec, lambda arrays=arrays: arrays, path, t, meta)
                for rec, arrays, path in self._shards(t, N.FACTORS)
            ]
        return merge_factors(parts, t)

    def _shards(self, t: int, prefix: str) -> list[tuple[StepRecord, Tensors, Path]]:
        """Ranks 1 … R−1's shards of step t of a distributed run: record, tensors, file."""
        out = []
        for r in range(1, self.world_size):
            rec, tensors = read_shard(self.path, r, t, prefix, verify=self.verify, require=self._require_sums)
            out.append((StepRecord.from_json(rec), tensors, shard_layout(self.path, r).step_file(t)))
        return out

    # -- size -------------------------------------------------------------------------------------
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def _tags_of(record: StepRecord, load: Callable[[], Tensors], path: Path, t: int) -> dict[str, Any]:
    """The tags of one step file (or shard): per-sample ones from its tensors (`load()`)."""
    stored = record.tags
    arrays = load() if any(isinstance(v, dict) for v in stored.values()) else {}
    missing = [k for k, v in stored.items() if isinstance(v, dict) and k not in arrays]
    if missing:
        raise CorruptStepError(
            f"Step {t}: {path} lists per-sample tags {missing} but holds no tensor for them; "
            "the file is damaged: restore it or re-record."
        )
    return {k: arrays[k] if isinstance(v, dict) else v for k, v in stored.items()}


def _factors_of(
    record: StepRecord, load: Callable[[], Tensors], path: Path, t: int, meta: dict[str, Any]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factors of one step file (or shard), from its packed vectors (`load()`)."""
    if not record.factor_calls:
        return {}
    flats = load()
    layout, aliases = record.factor_layout, record.factor_aliases

    def get(key: str) -> torch.Tensor:
        dtype, offset, shape = layout[aliases.get(key, key)]
        end = offset + torch.Size(shape).numel()
        if dtype not in flats or flats[dtype].dim() != 1 or end > len(flats[dtype]):
            raise CorruptStepError(
                f"Step {t}: the factor {key} of {path} lies outside its stored vector; the file "
                "is damaged: restore it or re-record."
            )
        return flats[dtype][offset:end].view(shape)

    out = {}
    for module, n_calls in record.factor_calls.items():
        pairs = [
            (get(f"{N.FACTOR_X}{module}/{k}"), get(f"{N.FACTOR_G}{module}/{k}"))
            for k in range(n_calls)
        ]
        if meta.get(module, {}).get("kind") == "conv2d":
            pairs = [_unfold(x, g, meta[module]) for x, g in pairs]
        out[module] = concat_pairs(pairs)
    return out


def _row(record: StepRecord) -> dict[str, Any]:
    row = {
        k: getattr(record, k)
        for k in ("step", "time", "skipped", "skip_reason", "lr", "grad_norm", "update_norm",
                  "clip_coef", "grad_coef")
    }
    row["n_samples"] = sum(record.batch_sizes) or None
    row["tags"] = ",".join(sorted(record.tags))
    for name, value in record.tags.items():
        if not isinstance(value, (dict, list)):
            row[f"tag/{name}"] = value
    for name, norm in record.update_norms.items():
        row[f"update_norm/{name}"] = norm
    return row


def _unfold(x: torch.Tensor, g: torch.Tensor, meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv2d factors as rows per output position: X [n, L, C·kh·kw], G [n, L, out]."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    cols = F.unfold(
        work,
        kernel_size=meta["kernel_size"],
        dilation=meta["dilation"],
        padding=meta["padding"],
        stride=meta["stride"],
    ).to(x.dtype)  # [n, C·kh·kw, L]
    return cols.transpose(1, 2), g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)


class ShardedRun(ShardedRunMixin, Run):
    """An FSDP2 run: each rank's shards joined into full parameters (see `chisel.store.shards_run`)."""

    plain = Run
    row = staticmethod(_row)


def load(run_dir: str | os.PathLike, *, verify: bool = True) -> Run:
    """Open a run directory written by `chisel.record` (also while it is written, or after a crash).

    Every step and keyframe file read is checked against the CRC32 stored in it (a damaged file
    is a `CorruptStepError`); `verify=False` skips the check for speed. The manifest is checked
    against its schema either way (`ManifestError`, a `NotARunError`). An FSDP2 run reads as a
    `ShardedRun`: the ranks' shards joined into full parameters."""
    run = Run(run_dir, verify=verify)
    return ShardedRun(run_dir, verify=verify) if is_sharded_run(run.manifest) else run
