"""`chisel.record`: attach to a training loop and record every optimizer update to a run directory."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import warnings
import weakref
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chisel import _names as N
from chisel._version import __version__
from chisel.capture.config import Compact, RecordConfig, StorageDtype, dtype_name
from chisel.capture.distributed import RankInfo, rank_info, unwrap_model
from chisel.capture.distributed_fsdp import is_sharded, shard_spec
from chisel.capture.hooks import StepCapture
from chisel.capture.optim import hook_target
from chisel.errors import (
    ChiselError,
    NotARunError,
    RecordConfigError,
    ResumeMismatchError,
    RunExistsError,
    TagError,
    WriterError,
)
from chisel.store.layout import RunLayout, write_json
from chisel.store.run_dir import open_run
from chisel.store.shards import DISTRIBUTED, sharded_manifest
from chisel.store.shards_open import open_rank, open_sharded
from chisel.store.writer import RunWriter


class Recorder:
    """Records every `optimizer.step()` of a training loop into `run_dir`.

    Use as a context manager, or call `close()`; hooks are removed on close, on leaving the
    `with` block and on an exception inside it. See `chisel.record` for the options.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        run_dir: str | os.PathLike,
        config: RecordConfig,
        *,
        scaler: Any = None,
        overwrite: bool = False,
        resume: bool = False,
        metadata: dict[str, Any] | None = None,
        tensorboard: bool | str | os.PathLike = False,
        features: Any = None,
        distributed: bool | None = None,
    ) -> None:
        _check_arguments(model, run_dir, metadata)
        model = unwrap_model(model)  # DDP: the plain model's names, so the run is attributed with it
        # None outside a distributed job (or with distributed=False); rank ≥ 1 writes shards only
        self._rank = rank_info() if distributed is not False else None
        if distributed and self._rank is None:
            raise RecordConfigError(
                "distributed=True, but torch.distributed has no initialized process group of more "
                "than one rank. Call dist.init_process_group(...) first, or leave distributed out."
            )
        self._view = None
        live = tensorboard is not False and tensorboard is not None
        if features is not None and not live:
            raise RecordConfigError(
                "features= is shown by the TensorBoard view (each feature's geometry per step); "
                "pass tensorboard=True (or a log directory) with it, or leave features out."
            )
        if self._rank is not None and not self._rank.writes_run:
            live = False  # DDP: rank 0's view shows the update; the other ranks hold no θ to show
        if live:
            from chisel.integrations.tensorboard import LiveView, log_dir

            geometry = None
            if features is not None:  # sites checked now; hooks only once the run has started
                from chisel.integrations.live_geometry import LiveGeometry

                geometry = LiveGeometry(model, features)
            # the package is checked here; the event files appear with the first step
            self._view = LiveView(log_dir(run_dir, tensorboard), geometry)
        # imported on use: `import chisel` stays light
        from chisel.integrations.optimizers import unwrap_optimizer

        if any(getattr(optimizer, a, None) is not None for a in ("optimizer", "_optimizer")):
            optimizer = unwrap_optimizer(optimizer)  # accelerate / Lightning: the real one
        self.run_dir = Path(run_dir)
        self.config = config
        self._closed = False
        self._first_step = 0
        self._sharded = _check_sharded(optimizer, self._rank, config, resume)  # FSDP2
        if self._rank is None:
            opener: Any = open_run
        else:
            opener = partial(open_sharded if self._sharded else open_rank, info=self._rank)
        try:
            opened = opener(
                self.run_dir,
                overwrite=overwrite,
                resume=resume,
                check_resume=lambda manifest: self._check_resume(manifest, model, optimizer),
            )
        except OSError as err:
            if isinstance(err, (RunExistsError, NotARunError)):
                raise
            raise WriterError(
                f"chisel cannot set up the run directory {self.run_dir}: "
                f"{err.strerror or err}. Choose a writable run_dir (or fix its permissions)."
            ) from err
        self.layout = opened.layout
        first_step, manifest = opened.first_step, opened.manifest
        self._first_step = first_step
        # the hooks reach the writer through this box, not through `self`: a Recorder dropped
        # without close() can then be collected, and its finalizer removes the hooks
        box: dict[str, RunWriter] = {}
        shard = self._rank is not None and not self._rank.writes_run and not self._sharded
        self._writes_run = not shard

        def sink(item: Any) -> None:  # a rank ≥ 1's packets hold only its factors and tags
            box["writer"].submit(item)

        fresh = opened.fresh  # a failed start of a new run must leave nothing behind
        try:
            self._capture = StepCapture(
                model,
                optimizer,
                config,
                sink=sink,
                check=lambda: box["writer"].check(),
                first_step=first_step,
                scaler=scaler,
                distributed=self._rank,
                theta=not shard,
            )
            self._writer = box["writer"] = RunWriter(self.layout, self._capture.layout, config)
            if self._view is not None:
                self._writer.on_step = self._view.add_step
                self._writer.step_deltas = self._view.geometry is not None
        except BaseException:
            opened.abandon()
            raise
        try:
            # θ_0 is on disk before the manifest makes the run visible: a visible run always
            # has the parameters its first step starts from
            if not shard:
                self._writer.write_keyframe_now(self._capture.keyframe("resume" if resume else "start"))
                if manifest is None:
                    manifest = self._new_manifest(model, metadata)
                manifest.setdefault("starts", []).append(
                    {"step": first_step, "time": _dt.datetime.now().isoformat(), "resumed": resume}
                )
                write_json(self.layout.manifest, manifest)
                if self._sharded and self._rank is not None and self._rank.writes_run:
                    self._write_sharded_manifest(manifest)
            self._capture.attach()
            if self._view is not None and self._view.geometry is not None:
                # binds at the first forward pass, to the parameters this run records
                self._view.geometry.attach(optimizer, self._capture.layout.names)
        except BaseException as err:
            with contextlib.suppress(Exception):
                self._capture.detach()
            if self._view is not None:
                with contextlib.suppress(Exception):
                    self._view.close()
            with contextlib.suppress(Exception):  # the first error is the one to report
                self._writer.close()
            opened.abandon()
            if isinstance(err, OSError) and not isinstance(err, ChiselError):
                left = "Nothing was left behind" if fresh else "The run's recorded steps are intact"
                raise WriterError(
                    f"chisel cannot start the run in {self.run_dir}: {err.strerror or err}. "
                    f"{left}; fix the cause (disk space, permissions) and retry."
                ) from err
            raise
        self._finalizer = weakref.finalize(
            self, _abandon, self._capture, self._writer, str(self.run_dir), self._view
        )

    # -- set-up ---------------------------------------------------------------------------------
    def _check_resume(self, manifest: dict[str, Any], model: nn.Module, optimizer: Any) -> None:
        from chisel.capture.optim import named_optimizer_params

        stored = manifest["config"].get("compact")  # a step file's encoding must be the manifest's
        if stored != (self.config.to_json()["compact"]):
            raise ResumeMismatchError(
                f"resume=True with compact={self.config.compact!r}, but the run in {self.run_dir} was "
                f"recorded with compact={stored!r}: its steps could not be read as one run. Resume "
                "with the run's compact option, or start a new run."
            )
        names, params = named_optimizer_params(model, hook_target(optimizer))
        have = {n: (tuple(p.shape), dtype_name(p.dtype)) for n, p in zip(names, params)}
        want = {p["name"]: (tuple(p["shape"]), p["dtype"]) for p in manifest["params"]}
        if have != want:
            only_model = sorted(set(have.items()) - set(want.items()))[:4]
            only_run = sorted(set(want.items()) - set(have.items()))[:4]
            raise ResumeMismatchError(
                f"resume=True, but the model's parameters differ from the run in {self.run_dir}: "
                f"the model has {only_model}, the run has {only_run}. Resume with the same "
                "architecture and optimizer, or start a new run."
            )
        kind = type(hook_target(optimizer)).__name__
        if manifest["optimizer"]["class"] != kind:
            raise ResumeMismatchError(
                f"resume=True with a {kind} optimizer, but the run in {self.run_dir} was recorded "
                f"with {manifest['optimizer']['class']}: its updates could not be split "
                "consistently. Resume with the same optimizer class, or start a new run."
            )

    def _new_manifest(self, model: nn.Module, metadata: dict[str, Any] | None) -> dict[str, Any]:
        cap, writer = self._capture, self._writer
        recorded = {id(p) for p in cap.owners}
        return {
            "format_version": N.FORMAT_VERSION,
            "chisel_version": __version__,
            "torch_version": torch.__version__,
            "created": _dt.datetime.now().isoformat(),
            "model": {"class": type(model).__name__, "repr": repr(model)[:20000]},
            "optimizer": {
                "class": type(cap.optimizer).__name__,
                "defaults": {k: str(v) for k, v in cap.optimizer.defaults.items()},
            },
            "params": [
                {
                    "name": n,
                    "shape": list(p.shape),
                    "dtype": dtype_name(p.dtype),
                    "encoding": writer.encodings[n],
                }
                for n, p in zip(cap.names, cap.params)
            ],
            "frozen": [n for n, p in model.named_parameters() if id(p) not in recorded],
            "layout": cap.layout.to_json(),
            "factor_modules": cap.factors.meta if cap.factors is not None else {},
            "config": self.config.to_json(),
            "metadata": metadata or {},
            **({DISTRIBUTED: self._rank.to_json()} if self._rank is not None and not self._sharded else {}),
        }

    def _write_sharded_manifest(self, own: dict[str, Any]) -> None:
        """FSDP2: the run directory's manifest (full shapes, how each parameter is cut)."""
        cap = self._capture
        specs = {n: shard_spec(p) for n, p in zip(cap.names, cap.owners)}
        assert self._rank is not None
        write_json(RunLayout(self.run_dir).manifest, sharded_manifest(own, specs, self._rank.to_json()))

    # -- while training -------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Index the next optimizer step will get."""
        return self._capture.step

    @property
    def durable_steps(self) -> int:
        """Steps 0 … durable_steps − 1 are on disk (renamed into place; fsynced with
        fsync=True). Later steps acknowledged by `optimizer.step()` may still wait in the
        writer's queue (at most queue_size + 1): a SIGKILL loses those. See `flush()`."""
        return self._first_step + self._writer.steps_written

    def flush(self) -> int:
        """Wait until every step handed to the writer is on disk; return `durable_steps`.

        Call it before a checkpoint so the run and the checkpoint agree. Raises `WriterError`
        if the writer failed."""
        self._writer.flush()
        return self.durable_steps

    def tag(self, **values: Any) -> None:
        """Attach values to the coming optimizer step: a scalar, or one value per sample.

        Several calls before one step concatenate per name (micro-batches of gradient
        accumulation). A length that matches no batch of this step raises `TagError`, and so
        does a tag given after the recorder was closed (it would belong to no step).
        """
        if self._closed:
            raise TagError(
                f"rec.tag({', '.join(values)}) after the recorder for {self.run_dir} was closed: "
                "the tag belongs to no recorded step. Tag inside the `with chisel.record(...)` "
                "block, before optimizer.step()."
            )
        self._capture.tags.add(**values)

    # -- closing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook, write an exact keyframe of the final θ, flush and stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        try:
            self._capture.detach()
            if not self._writer.failed and self._writes_run:  # rank ≥ 1 of DDP: no θ
                self._writer.submit(self._capture.keyframe("end"))
        finally:
            try:
                self._writer.close()
            finally:
                if self._view is not None:
                    self._view.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # keep the original exception; still remove hooks and flush what was recorded
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        cap = self._capture
        n_values = sum(p.numel() for p in cap.params)
        factors = list(cap.factors.modules) if cap.factors is not None else []
        shown = ", ".join(factors[:4]) + (", …" if len(factors) > 4 else "")
        state = "closed" if self._closed else "recording"
        return (
            f"Recorder({state}: {self.run_dir}, next step {cap.step}; {len(cap.params)} params "
            f"({n_values:,} values) as {_storage(self.config)}; grads {'on' if self.config.grads else 'off'}; "
            f"factors of {len(factors)} modules [{shown}]; optimizer state at "
            f"{self.config.optim_state}; keyframe every {self.config.keyframe_every} steps)"
        )


def _storage(config: RecordConfig) -> str:
    c = config.compact
    return f"rank-{c.rank} {c.factor_dtype} factors (compact)" if c is not None else config.dtype


def _check_arguments(model: Any, run_dir: Any, metadata: Any) -> None:
    """What can be refused before anything is created on disk."""
    if not isinstance(model, nn.Module):
        raise RecordConfigError(
            f"model must be the torch nn.Module the optimizer trains, not a {type(model).__name__} "
            "(chisel names parameters and hooks layers through it)."
        )
    if not isinstance(run_dir, (str, os.PathLike)) or not str(run_dir):
        raise RecordConfigError(
            f"run_dir must be a directory path (str or pathlib.Path), not {run_dir!r}."
        )
    try:
        json.dumps(metadata or {}, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise RecordConfigError(
            f"metadata must be JSON-able (numbers, strings, lists, dicts): {err}. Convert tensors "
            "with .tolist() and other objects with str()."
        ) from None


def _check_sharded(optimizer: Any, rank: RankInfo | None, config: RecordConfig, resume: bool) -> bool:
    """True for an FSDP2 job (DTensor parameters); what it cannot record yet is refused by name."""
    params = [p for g in hook_target(optimizer).param_groups for p in g["params"]]
    if not any(is_sharded(p) for p in params):
        return False
    try:
        dims = {shard_spec(p)["dim"] for p in params if is_sharded(p)}
    except ValueError as err:
        raise RecordConfigError(f"The optimizer holds DTensor parameters: {err}") from None
    missing = [
        why for why, bad in (
            ("outside an initialized process group of more than one rank", rank is None),
            ("with resume=True", resume),
            ("with compact recording", getattr(config, "compact", None) is not None),
            ("with factors of parameters cut along another dim than 0", bool(config.factors) and bool(dims - {0, None})),
        ) if bad
    ]
    if missing:
        raise RecordConfigError(
            "The optimizer holds DTensor parameters (FSDP2's fully_shard): chisel records each "
            f"rank's shards, but not {'; nor '.join(missing)}. Drop that option (see "
            "docs/distributed.md for what FSDP2 recording covers)."
        )
    return True


def _abandon(capture: StepCapture, writer: RunWriter, run_dir: str, view: Any = None) -> None:
    """Finalizer of a Recorder dropped without close(): remove its hooks, stop its writer."""
    with contextlib.suppress(Exception):
        capture.detach()
    with contextlib.suppress(Exception):
        writer.close()
    if view is not None:
        with contextlib.suppress(Exception):
            view.close()
    warnings.warn(
        f"a chisel Recorder for {run_dir} was dropped without close(): its hooks were removed "
        "and its writer stopped, but no final keyframe was written. Use `with chisel.record(...)`.",
        ResourceWarning,
        stacklevel=2,
    )


def record(
    model: nn.Module,
    optimizer: Any,
    run_dir: str | os.PathLike,
    *,
    factors: bool | list[str] | tuple[str, ...] = False,
    dtype: StorageDtype = "float32",
    factor_dtype: StorageDtype | None = None,
    factors_every: int = 1,
    grads: bool | None = None,
    optim_state: str = "keyframes",
    keyframe_every: int = 100,
    queue_size: int = 4,
    fsync: bool = False,
    scaler: Any = None,
    overwrite: bool = False,
    resume: bool = False,
    metadata: dict[str, Any] | None = None,
    tensorboard: bool | str | os.PathLike = False,
    features: Any = None,
    compact: bool | Compact | None = None,
    distributed: bool | None = None,
) -> Recorder:
    """Record every update of `optimizer` (whose parameters belong to `model`) into `run_dir`.

    Args:
        model: the module whose parameters the optimizer updates (names come from it).
        optimizer: a torch optimizer (or a wrapper whose `.optimizer` is one, e.g. accelerate's).
        run_dir: a new or empty directory (see `overwrite` / `resume`).
        factors: per-sample factors (x_i, g_i) of every Linear / Conv1D / Conv2d (True) or of
            the named modules.
        dtype, factor_dtype, factors_every, optim_state, keyframe_every, queue_size, fsync: see
            `RecordConfig`.
        grads: store the gradient the optimizer consumed at every step (default: True, False
            with `compact`).
        compact: True or `chisel.Compact(rank=...)`: store each weight's per-step update as
            low-rank factors with error feedback (bytes per step set by the rank, not the
            parameter count; keyframes stay exact; each step's error is stored). See
            docs/recording.md, "Compact recording".
        distributed: None (default) records one run together with the other ranks when
            torch.distributed has a process group of more than one rank; False records this
            process alone even then (independent runs per rank, each its own `run_dir`); True
            requires the process group.
        scaler: the AMP `GradScaler`, so that skipped steps are recorded as skipped.
        overwrite: replace an existing run in `run_dir`.
        resume: continue the step numbering of the run in `run_dir` (after a checkpoint reload).
        metadata: JSON-able values stored in the manifest (hyper-parameters, seed, …).
        tensorboard: stream each step's update norms (total and per module), grad norm, lr
            and tags (`rec.tag(loss=...)`) to TensorBoard: True for `<run_dir>/tensorboard`,
            or a log directory. Written by chisel's writer thread, off the training thread;
            needs the `tensorboard` package (see `chisel.integrations.tensorboard`).
        features: with `tensorboard`, also stream each feature's geometry per step:
            `geometry/read/<feature>@<param>` = ‖ΔW d‖ for a weight reading its site and
            `geometry/write/<feature>@<param>` = ‖uᵀΔW‖ for one writing it (bound by tensor
            identity during the first training forward pass; see
            `chisel.integrations.live_geometry`).

    In a `torch.distributed` job call it on every rank with the same `run_dir`: under
    DistributedDataParallel (pass the wrapped model; parameters keep the plain model's names)
    rank 0 records the update and every rank its samples' factors and tags, and a step whose
    ranks disagree on θ raises `RankMismatchError`; under FSDP2 (`fully_shard`) each rank records
    its shards and `chisel.load` joins them. See docs/distributed.md.

    Example:
        >>> with chisel.record(model, optimizer, "runs/x", factors=True) as rec:  # doctest: +SKIP
        ...     loss.backward(); rec.tag(advantage=adv); optimizer.step()
    """
    factors_opt: bool | tuple[str, ...] = (
        factors if isinstance(factors, bool) else (factors,) if isinstance(factors, str) else tuple(factors)
    )
    config = RecordConfig(
        factors=factors_opt,
        dtype=dtype,
        factor_dtype=factor_dtype,
        factors_every=factors_every,
        grads=not compact if grads is None else grads,
        optim_state=optim_state,  # type: ignore[arg-type]
        keyframe_every=keyframe_every,
        queue_size=queue_size,
        fsync=fsync,
        compact=compact,  # type: ignore[arg-type]
    )
    return Recorder(
        model,
        optimizer,
        run_dir,
        config,
        scaler=scaler,
        overwrite=overwrite,
        resume=resume,
        metadata=metadata,
        tensorboard=tensorboard,
        features=features,
        distributed=distributed,
    )
