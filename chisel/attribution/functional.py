"""Evaluate a metric at points of an update path, without touching the user's model.

`UpdatePath(space, θ, Δθ)` evaluates m(θ + αΔθ) and ∇m for a batch of α at once with
`torch.func.vmap` (one call for all quadrature points), falling back to a loop over α for
models or metrics that vmap cannot trace.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from chisel._warn import warn_at_caller
from chisel.attribution.copying import private_copy
from chisel.attribution.metrics import Metric, describe
from chisel.errors import ChiselError
from probes.sites import module_at

Params = dict[str, Tensor]


class MetricError(ChiselError, ValueError):
    """A metric returned something that is not a finite scalar."""


class TrainModeWarning(UserWarning):
    """The model was in train mode with modules that act differently in eval mode (dropout,
    batch norm…); chisel evaluated the metric on an eval-mode copy instead."""


@functools.lru_cache(maxsize=256)
def _reads_training(cls: type) -> bool:
    """A user-defined module whose forward branches on `self.training` (noisy nets, F.dropout…).

    Lines that only gate gradient checkpointing (every Hugging Face model has one) do not count.
    """
    forward = getattr(cls, "forward", None)
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return any("self.training" in line and "checkpointing" not in line for line in source.splitlines())


def _mode_dependent_modules(model: nn.Module) -> list[str]:
    """Names of the modules in train mode whose output would change in eval mode."""
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd):
            differs = m.p > 0
        elif isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*
            differs = m.track_running_stats
        elif isinstance(m, nn.MultiheadAttention):
            differs = m.dropout > 0
        elif isinstance(m, nn.RReLU):
            differs = True
        elif type(m).__module__.startswith("torch."):
            differs = False  # torch's other modules: same numbers in both modes
        else:
            differs = _reads_training(type(m))
        if differs:
            found.append(f"{name or '<model>'} ({type(m).__name__})")
    return found


class MetricCall(nn.Module):
    """Wraps `metric(model)` as a module so `functional_call` can swap the parameters."""

    def __init__(self, model: nn.Module, metric: Metric) -> None:
        super().__init__()
        self.model = model
        self._metric = metric

    def forward(self) -> Tensor:
        return self._metric(self.model)


class ParamSpace:
    """`m(θ)` and `∇m(θ)` for the recorded parameters; everything else is the model's own.

    The model is deep-copied and cast to `dtype` once, so evaluating never changes the
    caller's model, and frozen parameters and buffers share θ's dtype. The copy is put in eval
    mode: m(θ) must be a deterministic function of θ for the path integral to close (dropout
    would make every evaluation a different function). A model left in train mode with
    modules for which that matters gets a `TrainModeWarning`; the caller's model keeps its mode.
    """

    def __init__(
        self,
        model: nn.Module,
        metric: Metric,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        *,
        batch_bytes: int = 256 * 2**20,
        batch_points: bool | None = None,
    ) -> None:
        changed = _mode_dependent_modules(model)
        if changed:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            warn_at_caller(
                f"chisel: the model is in train mode, and these modules act differently in eval mode: "
                f"{shown}. "
                "Attribution evaluates the metric on an eval-mode copy (dropout off, batch norm "
                "with its running statistics), so that the metric is a deterministic function of "
                "the parameters and the attributions sum to the metric's change; your model's "
                "mode is left as it is. Call model.eval() before attributing to silence this.",
                TrainModeWarning,
            )
        copied = private_copy(model).to(device=device, dtype=dtype).eval()
        for p in copied.parameters():
            p.requires_grad_(False)
        self._call = MetricCall(copied, metric)
        self.model = copied
        self.metric = metric
        self.dtype = dtype
        self.device = torch.device(device)
        self.batch_bytes = batch_bytes
        self.evaluations = 0  # metric evaluations (a vmapped batch of K counts K)
        self.use_vmap = True  # forward-only batches (kink search): vmap, unless it cannot trace
        # gradients at the quadrature points: one vmapped call on accelerators; on CPU a loop of
        # plain backward passes measured faster (1.15x vs 1.45x the floor, benchmarks/attribution.py)
        self.batch_points = self.device.type != "cpu" if batch_points is None else batch_points

    def check(self, value: Tensor) -> Tensor:
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise MetricError(
                f"the metric {describe(self.metric)} returned {shape}; a metric must return a "
                "scalar tensor (reduce with .mean() or .sum())."
            )
        if not math.isfinite(float(value.detach())):
            raise MetricError(
                f"the metric {describe(self.metric)} returned {float(value.detach())}; it must be "
                "finite at every point of the update path (check for log(0) or a division by zero)."
            )
        return value.reshape(())

    def call(self, params: Params) -> Tensor:
        with self.explain_errors():
            return functional_call(self._call, {f"model.{n}": v for n, v in params.items()}, ())

    def mean_inputs(
        self, params: Params, modules: list[str], reference: Any = None
    ) -> dict[str, Tensor]:
        """{module: x̄ [in]} at `params`: over the metric's states, or over `reference` (model
        inputs: a tensor or a tuple of positional inputs) when given."""
        if reference is None:
            return input_means(self.model, modules, lambda: self.call(params))
        args = reference if isinstance(reference, tuple) else (reference,)
        args = tuple(
            a.to(self.device, self.dtype) if isinstance(a, Tensor) and a.is_floating_point() else a
            for a in args
        )
        return input_means(self.model, modules, lambda: functional_call(self.model, params, args))

    def run_metric(self) -> Tensor:
        """The metric on the copied model's own parameters (used to bind feature sites)."""
        with self.explain_errors():
            return self.metric(self.model)

    @contextlib.contextmanager
    def explain_errors(self):
        try:
            yield
        except RuntimeError as err:
            text = str(err)
            if "dtype" in text or "scalar type" in text:
                raise MetricError(
                    f"the metric {describe(self.metric)} failed on the model in {self.dtype}: {text}. "
                    "Attribution runs the model in `dtype` (float64 by default); move the metric's "
                    "data to the model's dtype with chisel.metrics.as_input(x, model)."
                ) from err
            raise

    def value(self, params: Params) -> float:
        with torch.no_grad():
            self.evaluations += 1
            return float(self.check(self.call(params)))

    def value_and_grad(self, params: Params) -> tuple[float, Params]:
        leaves = {n: v.detach().requires_grad_(True) for n, v in params.items()}
        with torch.enable_grad():
            self.evaluations += 1
            out = self.check(self.call(leaves))
            if not out.requires_grad:
                raise MetricError(
                    f"the metric {describe(self.metric)} returned a value with no gradient "
                    "with respect to the recorded parameters: it was detached (.detach(), "
                    ".item(), numpy, torch.no_grad() inside the metric) or it does not use the "
                    "model. Return a tensor computed from the model's outputs."
                )
            grads = torch.autograd.grad(out, list(leaves.values()), allow_unused=True)
        return float(out.detach()), {
            n: torch.zeros_like(v) if g is None else g for (n, v), g in zip(leaves.items(), grads)
        }


def input_means(model: nn.Module, modules: list[str], run_forward: Callable[[], Any]) -> dict[str, Tensor]:
    """{module: x̄ [in]}: each module's first input averaged over every row it sees during one
    no-grad `run_forward()` (a module that does not run is absent). Seen in a forward pre-hook,
    before the module runs. Shared by the centred split and the validation's reversion game."""
    sums: dict[str, tuple[Tensor, int]] = {}

    def hook_for(name: str):
        def pre(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])  # [rows, in]
            total, count = sums.get(name, (0.0, 0))
            sums[name] = (total + rows.sum(0), count + rows.shape[0])

        return pre

    handles = [module_at(model, m).register_forward_pre_hook(hook_for(m)) for m in modules]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    return {m: total / count for m, (total, count) in sums.items()}


class UpdatePath:
    """θ(α) = θ + α·Δθ and the metric along it, evaluated for batches of α."""

    def __init__(self, space: ParamSpace, theta: Params, delta: Params) -> None:
        self.space, self.theta, self.delta = space, theta, delta
        n_values = sum(v.numel() for v in theta.values())
        itemsize = torch.finfo(space.dtype).bits // 8
        # a vmapped batch materialises K copies of θ (and of ∇m): keep K copies under the budget
        self.chunk = max(1, int(space.batch_bytes // max(1, 3 * n_values * itemsize)))

    def at(self, alpha: float) -> Params:
        return {n: self.theta[n] + alpha * self.delta[n] for n in self.theta}

    def _stacked(self, alphas: Tensor) -> Params:
        shape = lambda v: (len(alphas),) + (1,) * v.ndim  # noqa: E731
        return {
            n: self.theta[n].unsqueeze(0) + alphas.reshape(shape(v)) * self.delta[n].unsqueeze(0)
            for n, v in self.theta.items()
        }

    def _chunks(self, alphas: Tensor):
        for start in range(0, len(alphas), self.chunk):
            yield start, alphas[start : start + self.chunk]

    def _run(self, batched: Callable, looped: Callable, alphas: Tensor):
        """Try the vmapped evaluation once; on failure fall back to the loop for good."""
        if self.space.use_vmap:
            try:
                return batched(alphas)
            except MetricError:
                raise
            except Exception as err:  # an op vmap cannot trace: data-dependent control flow…
                warn_at_caller(
                    f"chisel: evaluating the metric with torch.func.vmap failed ({err!r:.200}); "
                    "falling back to one evaluation per quadrature point (slower, same result)."
                )
                self.space.use_vmap = False
        return looped(alphas)

    def weighted_grad(self, alphas: Tensor, weights: Tensor) -> Params:
        """Σ_k w_k ∇m(θ(α_k)), float64 weights applied inside the chunks (bounded memory)."""
        space = self.space
        total = {n: torch.zeros_like(v) for n, v in self.theta.items()}
        alphas = alphas.to(space.device, space.dtype)
        weights = weights.to(space.device, space.dtype)

        def batched(a: Tensor) -> Params:
            fn = vmap(grad_and_value(lambda p: space.call(p)))
            for start, chunk in self._chunks(a):
                grads, values = fn(self._stacked(chunk))
                for v in values:
                    space.check(v)
                space.evaluations += len(chunk)
                w = weights[start : start + len(chunk)]
                for n, g in grads.items():
                    total[n].add_(torch.tensordot(w, g, dims=1))
            return total

        def looped(a: Tensor) -> Params:
            for n in total:
                total[n].zero_()
            for alpha, w in zip(a.tolist(), weights.tolist()):
                _, grads = space.value_and_grad(self.at(alpha))
                for n, g in grads.items():
                    total[n].add_(g, alpha=w)
            return total

        if not space.batch_points:
            return looped(alphas)
        return self._run(batched, looped, alphas)

    def outputs(self, alphas: Tensor, fn: Callable[[Params], Tensor]) -> Tensor:
        """`fn(θ(α))` for every α, no grad: [K, ...]. `fn` may run the model with hooks."""
        space = self.space
        alphas = alphas.to(space.device, space.dtype)

        def batched(a: Tensor) -> Tensor:
            mapped = vmap(fn)
            with torch.no_grad():
                parts = [mapped(self._stacked(chunk)) for _, chunk in self._chunks(a)]
            space.evaluations += len(a)
            return torch.cat(parts)

        def looped(a: Tensor) -> Tensor:
            with torch.no_grad():
                space.evaluations += len(a)
                return torch.stack([fn(self.at(alpha)) for alpha in a.tolist()])

        return self._run(batched, looped, alphas)
