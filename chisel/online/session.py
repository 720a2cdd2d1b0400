"""`chisel.online_ledger`: attribution rows computed during training, the updates never kept."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from chisel.attribution.binding import bind
from chisel.attribution.engine import Features, _feature_set
from chisel.attribution.functional import ParamSpace
from chisel.attribution.metrics import Metric
from chisel.capture.factors import FactorCapture
from chisel.online import ghost, rows
from chisel.online.parts import OnlineLedgerError, OptimizerParts
from chisel.online.writer import Columns, OnlineWriter

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def _without_hooks(model: nn.Module):
    """The model's module hooks set aside while its private copy is made, then put back."""
    saved = [(m, name, getattr(m, name)) for m in model.modules() for name in _HOOKS
             if isinstance(getattr(m, name, None), dict)]
    try:
        for m, name, value in saved:
            setattr(m, name, type(value)())
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


class OnlineLedger:
    """Optimizer hooks that write, per step, the geometry rows (exact), the first-order integrated
    rows and the first-order per-sample credit of `metric` to the parquet ledger `out`.

    Use it as a context manager around the training loop, like `chisel.record`; the hooks are
    removed on exit, on errors too. See docs/online-ledger.md.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, features: Features,
                 metric: Metric, out: str | os.PathLike, *, credit: bool = True,
                 centred: bool = True, sample_features: bool = False,
                 dtype: torch.dtype | None = None, flush_every: int = 64, every: int = 1) -> None:
        if not isinstance(model, nn.Module):
            raise OnlineLedgerError(f"model is a {type(model).__name__}; give the nn.Module being trained.")
        if not hasattr(optimizer, "register_step_pre_hook"):
            raise OnlineLedgerError(
                f"optimizer is a {type(optimizer).__name__} without step hooks; give the "
                "torch.optim.Optimizer that trains `model`."
            )
        if not callable(metric):
            raise OnlineLedgerError("metric must be a callable model -> scalar tensor (see chisel.metrics).")
        if out is None or Path(out).is_dir():
            raise OnlineLedgerError(
                f"out={out!r}: give the ledger's file path, e.g. 'runs/x/online-ledger.parquet'."
            )
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise OnlineLedgerError(f"flush_every={flush_every!r}: give an int >= 1 (steps per write).")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise OnlineLedgerError(
                f"every={every!r}: give an int >= 1 (rows for steps t with t % every == 0)."
            )
        self.model, self.optimizer, self.metric = model, optimizer, metric
        self.features = _feature_set(features)
        self.out, self.credit, self.centred = Path(out), credit, centred
        self.sample_features, self.flush_every, self.every = sample_features, flush_every, every
        self.dtype = dtype or next(model.parameters()).dtype
        self.step = 0
        self._handles: list[Any] = []
        self._open = False

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> OnlineLedger:
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        trained = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        self._params = {n: p for n, p in self.model.named_parameters() if id(p) in trained}
        if not self._params:
            raise OnlineLedgerError("the optimizer trains none of the model's parameters.")
        with _without_hooks(self.model):  # the copy must not hold or run chisel.record's hooks
            self._space = ParamSpace(self.model, self.metric, self.dtype)
        self._binding = bind(self._space.model, self._space.run_metric, torch.float64,
                             set(self._params), self.features, self.centred)
        self._sites = rows.site_of(self._binding)
        self._layers = {
            name: ghost.LinearFactors(name, self._names[id(m.weight)],
                                      self._names.get(id(m.bias)) if m.bias is not None else None)
            for name, m in self.model.named_modules()
            if type(m) is nn.Linear and id(m.weight) in trained
        }
        self._parts = OptimizerParts(self.optimizer, self._names, self.dtype) if self.credit else None
        self._writer = OnlineWriter(self.out)
        self._columns = Columns()
        self._pending: tuple[int, list, list, float, float] | None = None
        self._means: dict[str, tuple[Tensor, int]] = {}
        try:
            self._attach()
        except BaseException:
            self._detach()
            self._writer.abort()
            raise
        self._open = True
        return self

    def _attach(self) -> None:
        readers = [w for p, (ins, _) in self._binding.blocks.items() if ins is not None
                   for w in [self._binding.by_param[p]] if w.bias]
        copy = dict(self._space.model.named_modules())
        for w in readers if self.centred else []:
            self._handles.append(copy[w.module].register_forward_pre_hook(self._mean_hook(w.module)))
        if self.credit and self._layers:
            self._capture = FactorCapture(self.model, tuple(self._layers))
            self._capture.attach()
        else:
            self._capture = None
        self._handles.append(self.optimizer.register_step_pre_hook(self._before))
        self._handles.append(self.optimizer.register_step_post_hook(self._after))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if getattr(self, "_capture", None) is not None:
            self._capture.detach()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(Exception):
            self._detach()
            self._writer.abort()
        self._open = False

    def close(self) -> None:
        """Measure m at the final parameters (the last step's Δm), write, remove every hook."""
        if not self._open:
            return
        self._open = False
        failed = True
        try:
            if self._pending is not None:
                self._finish(self._space.value(self._current_theta()))
            self._flush()
            failed = False
        finally:
            self._detach()
            self._writer.abort() if failed else self._writer.close()

    # -- the hooks -----------------------------------------------------------------------------
    def _mean_hook(self, module: str):
        def pre(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1])  # [rows, in]
            total, count = self._means.get(module, (0.0, 0))
            self._means[module] = (total + flat.sum(0), count + flat.shape[0])
        return pre

    def _current_theta(self) -> dict[str, Tensor]:
        """A copy of the trained parameters in the ledger's dtype (the optimizer changes θ in place)."""
        return {n: p.detach().to(self.dtype, copy=True) for n, p in self._params.items()}

    def _kept(self, t: int) -> bool:
        return t % self.every == 0

    def _before(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._kept(self.step):
            if self._pending is not None:  # the kept step before this one needs m(θ_t) only
                self._finish(self._space.value(self._current_theta()))
            return
        self._theta = self._current_theta()
        self._means.clear()
        self._m, self._grad_m = self._space.value_and_grad(self._theta)  # m(θ_t), ∇m(θ_t)
        if self._pending is not None:
            self._finish(self._m)
        self._grads = {n: p.grad.detach().to(self.dtype) for n, p in self._params.items()
                       if p.grad is not None}
        if self._parts is not None:
            self._coef = (self._capture.grad_coef()[0] if self._capture is not None else None) or 1.0
            self._parts.before_step()

    def _after(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._kept(self.step):
            self._rows_of_step()
        self.step += 1
        if self._capture is not None:  # per-sample factors only on the forwards of kept steps
            self._capture.enabled = self._kept(self.step)

    def _rows_of_step(self) -> None:
        t, theta, grad_m = self.step, self._theta, self._grad_m
        delta = {n: p.detach().to(self.dtype) - theta[n] for n, p in self._params.items()}
        means = {m: s / c for m, (s, c) in self._means.items()}
        exact = rows.geometry(t, self._binding, theta, delta)
        approx, total = rows.first_order(t, self._binding, delta, grad_m, means)
        # the [K, out, in] kernels only for per-sample feature rows
        sides = rows.kernels(self._binding, grad_m, means) if self.sample_features else {}
        chunks = []
        if self._parts is not None:
            steps = self._parts.after_step(theta, delta, self._grads)
            factors = self._capture.take() if self._capture is not None else {}
            chunks = ghost.credit_columns(t, steps, grad_m, factors, self._layers, self._coef,
                                          sides, self._sites, self.sample_features)
        self._pending = (t, exact + approx, chunks, self._m, total)
        self._theta = self._grads = None  # type: ignore[assignment]

    def _finish(self, m_after: float) -> None:
        t, dict_rows, chunks, m_before, total = self._pending  # type: ignore[misc]
        self._columns.add_rows(dict_rows + rows.completeness(t, m_before, m_after, total))
        for chunk in chunks:
            self._columns.add(chunk)
        self._columns.steps += 1
        self._pending = None
        if self._columns.steps >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        if self._columns.chunks:
            self._writer.write(self._columns)
        self._columns = Columns()

    def __repr__(self) -> str:
        return (f"OnlineLedger({type(self.model).__name__}, {type(self.optimizer).__name__}, "
                f"{len(self.features)} features, step={self.step}, out={str(self.out)!r})")


def online_ledger(model: nn.Module, optimizer: torch.optim.Optimizer, features: Features,
                  metric: Metric, out: str | os.PathLike, **options: Any) -> OnlineLedger:
    """Attribution during training: `with chisel.online_ledger(model, opt, features, metric,
    "ledger.parquet"): ...`. Options: credit, centred, sample_features, dtype, flush_every,
    every (rows for every this-many steps only; see `OnlineLedger`)."""
    return OnlineLedger(model, optimizer, features, metric, out, **options)


