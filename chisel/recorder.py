"""`chisel.record`: attach to a training loop and record every optimizer update to a run directory."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chisel import _names as N
from chisel.capture.config import RecordConfig, StorageDtype, dtype_name
from chisel.capture.hooks import StepCapture
from chisel.capture.optim import hook_target
from chisel.errors import ResumeMismatchError, RunExistsError
from chisel.store.layout import RunLayout, read_manifest, write_json
from chisel.store.manifest import check_manifest
from chisel.store.reader import complete_steps
from chisel.store.writer import RunWriter


def _version() -> str:
    from chisel import __version__

    return __version__


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
    ) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.layout = RunLayout(self.run_dir)
        self._closed = False
        first_step, manifest = self._prepare_dir(model, optimizer, overwrite, resume)
        self._capture = StepCapture(
            model,
            optimizer,
            config,
            sink=self._submit,
            check=self._check,
            first_step=first_step,
            scaler=scaler,
        )
        self._writer = RunWriter(self.layout, self._capture.layout, config)
        try:
            # θ_0 is on disk before the manifest makes the run visible: a visible run always
            # has the parameters its first step starts from
            self._writer.write_keyframe_now(self._capture.keyframe("resume" if resume else "start"))
            if manifest is None:
                manifest = self._new_manifest(model, metadata)
            manifest.setdefault("starts", []).append(
                {"step": first_step, "time": _dt.datetime.now().isoformat(), "resumed": resume}
            )
            write_json(self.layout.manifest, manifest)
            self._capture.attach()
        except BaseException:
            self._writer.close()
            raise

    # -- set-up ---------------------------------------------------------------------------------
    def _prepare_dir(
        self, model: nn.Module, optimizer: Any, overwrite: bool, resume: bool
    ) -> tuple[int, dict[str, Any] | None]:
        root = self.run_dir
        is_run = self.layout.manifest.is_file()
        if root.exists() and not root.is_dir():
            raise RunExistsError(f"run_dir {root} is a file; give a directory path.")
        if overwrite and resume:
            raise RunExistsError("Give either overwrite=True or resume=True, not both.")
        if root.is_dir() and any(root.iterdir()):
            if resume and is_run:
                manifest = check_manifest(read_manifest(root), self.layout.manifest)
                self._check_resume(manifest, model, optimizer)
                for tmp in root.glob(f"*/{N.TMP_PREFIX}*"):
                    tmp.unlink()
                return complete_steps(self.layout), manifest
            if overwrite and is_run:
                shutil.rmtree(root)
            elif overwrite or resume:
                raise RunExistsError(
                    f"{root} is not empty and is not a chisel run (no {N.MANIFEST}); chisel will "
                    "not delete or append to it. Choose another run_dir."
                )
            else:
                raise RunExistsError(
                    f"{root} already holds a run. Pass overwrite=True to replace it, resume=True to "
                    "continue its step numbering after a checkpoint reload, or choose another run_dir."
                )
        self.layout.make_dirs()
        return 0, None

    def _check_resume(self, manifest: dict[str, Any], model: nn.Module, optimizer: Any) -> None:
        from chisel.capture.optim import named_optimizer_params

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

    def _new_manifest(self, model: nn.Module, metadata: dict[str, Any] | None) -> dict[str, Any]:
        cap, writer = self._capture, self._writer
        recorded = {id(p) for p in cap.params}
        return {
            "format_version": N.FORMAT_VERSION,
            "chisel_version": _version(),
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
        }

    # -- while training -------------------------------------------------------------------------
    def _submit(self, item: Any) -> None:
        self._writer.submit(item)

    def _check(self) -> None:
        self._writer.check()

    @property
    def step(self) -> int:
        """Index the next optimizer step will get."""
        return self._capture.step

    def tag(self, **values: Any) -> None:
        """Attach values to the coming optimizer step: a scalar, or one value per sample.

        Several calls before one step concatenate per name (micro-batches of gradient
        accumulation). A length that matches no batch of this step raises `TagError`.
        """
        self._capture.tags.add(**values)

    # -- closing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook, write an exact keyframe of the final θ, flush and stop the writer."""
        if self._closed:
            return
        self._closed = True
        try:
            self._capture.detach()
            if self._writer._error is None:
                self._writer.submit(self._capture.keyframe("end"))
        finally:
            self._writer.close()

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
            f"({n_values:,} values) as {self.config.dtype}; grads {'on' if self.config.grads else 'off'}; "
            f"factors of {len(factors)} modules [{shown}]; optimizer state at "
            f"{self.config.optim_state}; keyframe every {self.config.keyframe_every} steps)"
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
    grads: bool = True,
    optim_state: str = "keyframes",
    keyframe_every: int = 100,
    queue_size: int = 4,
    fsync: bool = False,
    scaler: Any = None,
    overwrite: bool = False,
    resume: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Recorder:
    """Record every update of `optimizer` (whose parameters belong to `model`) into `run_dir`.

    Args:
        model: the module whose parameters the optimizer updates (names come from it).
        optimizer: a torch optimizer (or a wrapper whose `.optimizer` is one, e.g. accelerate's).
        run_dir: a new or empty directory (see `overwrite` / `resume`).
        factors: per-sample factors (x_i, g_i) of every Linear / Conv1D / Conv2d (True) or of
            the named modules.
        dtype, factor_dtype, factors_every, grads, optim_state, keyframe_every, queue_size, fsync: see
            `RecordConfig`.
        scaler: the AMP `GradScaler`, so that skipped steps are recorded as skipped.
        overwrite: replace an existing run in `run_dir`.
        resume: continue the step numbering of the run in `run_dir` (after a checkpoint reload).
        metadata: JSON-able values stored in the manifest (hyper-parameters, seed, …).

    Example:
        >>> with chisel.record(model, optimizer, "runs/x", factors=True) as rec:  # doctest: +SKIP
        ...     loss.backward(); rec.tag(advantage=adv); optimizer.step()
    """
    factors_opt: bool | tuple[str, ...] = factors if isinstance(factors, bool) else tuple(factors)
    config = RecordConfig(
        factors=factors_opt,
        dtype=dtype,
        factor_dtype=factor_dtype,
        factors_every=factors_every,
        grads=grads,
        optim_state=optim_state,  # type: ignore[arg-type]
        keyframe_every=keyframe_every,
        queue_size=queue_size,
        fsync=fsync,
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
    )
