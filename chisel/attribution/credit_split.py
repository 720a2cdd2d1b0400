"""The exact split of a recorded update over training samples: this step's, and through
momentum, earlier steps' (see `credit` for the rows and the mathematics).

    Δθ = weight_decay + Σ samples(gradient) + gradient (unresolved)
         + Σ samples(momentum) + momentum (unresolved) + residual
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from chisel.attribution.optim_replay import (
    GRADIENT,
    MOMENTUM,
    RESIDUAL,
    WEIGHT_DECAY,
    Coef,
    OptimizerReplay,
    Params,
    ReplayError,
    UpdateSplit,
)
from chisel.attribution.splits import _CHUNK_ELEMENTS, Kernels, read_kernels
from chisel.capture.factor_kinds import EMBEDDING as EMBEDDING_KIND
from chisel.capture.factor_kinds import NORMS as NORM_KINDS
from chisel.errors import ChiselError
from chisel.store.reader import Run

GRADIENT_UNRESOLVED = "gradient (unresolved)"
# ledger quantity: ‖gradient (unresolved)‖ / ‖gradient‖ of a param whose factor modules were not
# all captured at a step (site: the module paths, comma-separated)
NOT_CAPTURED_SHARE = "not_captured_share"
MOMENTUM_UNRESOLVED = "momentum (unresolved)"
# the leaves of the split: each sample-less part once, samples under GRADIENT / MOMENTUM
LEAVES = (WEIGHT_DECAY, GRADIENT, GRADIENT_UNRESOLVED, MOMENTUM, MOMENTUM_UNRESOLVED, RESIDUAL)
# default horizon: the earlier steps that hold 99% of the momentum buffer's mass. For a constant
# decay β the steps older than s hold a fraction β^(t−1−s) of it, so that is "decay ≥ 1%":
# 44 steps for Adam's β1 = 0.9, 459 for SGD momentum 0.99 (each step's factors are kept in
# memory while within reach; pass `horizon` to bound it). What lies beyond is reported per step.
MAX_HORIZON = 500
MIN_WEIGHT = 1e-2


class CreditError(ChiselError, ValueError):
    """The run or the inputs cannot give the credit split asked for."""


@dataclass(frozen=True)
class SampleBlock:
    """The terms of one param from the n samples of one step: term_i = coef ⊙ layout(g_i, x_i).

    `g` already holds the step's coefficient c. For a weight, layout(g, x) = Σ_T g_T x_Tᵀ as
    [out, in] ("linear"), its transpose ("conv1d", HF in × out) or reshaped to the conv weight
    ("conv2d", unfolded input); for a bias, Σ_T g_T. "embedding": x holds token ids [n, T] and
    layout(g, x) adds the rows g_T at the ids x_T ([vocab, d], never built per sample).
    "layernorm" / "rmsnorm": g holds the per-sample Σ_tokens g ⊙ x̂ (the scale's block) or
    Σ_tokens g (the shift's), times c, and term_i = g_i; x is not read. So in every kind a
    sample's term is linear in its g_i: scaling g_i by w_i scales term_i by w_i.
    """

    part: str  # GRADIENT (samples of this step) or MOMENTUM (samples of an earlier step)
    origin_step: int
    module: str
    param: str
    kind: str  # "linear" | "conv1d" | "conv2d" | "embedding" | "layernorm" | "rmsnorm"
    is_bias: bool
    x: Tensor  # [n, T, in] float64 (embedding: [n, T] int64 ids; norms: unused)
    g: Tensor  # [n, T, out] float64, times c (norms: [n, 1, numel])
    coef: Coef  # param shape or a number
    # Σ_i layout(g_i, x_i) without coef, param-shaped: the session computes it once per origin
    # step and module and shares it with every later block of those samples (not an init field:
    # `dataclasses.replace(block, g=...)` drops it, so a reweighted block sums its own g)
    unscaled: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def _norm(self) -> bool:
        return self.kind in NORM_KINDS

    @property
    def _rows(self) -> Tensor:
        """The per-sample vectors of a norm's scale or shift, or a bias: [n, numel]."""
        return self.g.sum(1)

    def _as_weight(self, m: Tensor, shape: torch.Size) -> Tensor:
        """An [out, in] matrix in the param's own layout."""
        return m.transpose(-1, -2) if self.kind == "conv1d" else m.reshape(*m.shape[:-2], *shape)

    def _as_matrix(self, w: Tensor) -> Tensor:
        """A param-shaped tensor as [out, in] (an embedding's [vocab, d] is its own)."""
        if self._norm:
            raise self._no_features()
        return w.T if self.kind == "conv1d" else w.reshape(w.shape[0], -1)

    def total(self, shape: torch.Size) -> Tensor:
        """Σ_i term_i, param-shaped: coef ⊙ `raw_total` (no per-sample tensors)."""
        return self.coef * self.raw_total(shape)

    def raw_total(self, shape: torch.Size) -> Tensor:
        """Σ_i layout(g_i, x_i), param-shaped, without coef: one matmul (or scatter); cached
        in `unscaled` when the session has it."""
        if self.unscaled is not None and self.unscaled.shape == shape:
            return self.unscaled
        if self.is_bias or self._norm:
            return self._rows.sum(0).reshape(shape)
        if self.kind == EMBEDDING_KIND:
            rows = torch.zeros(shape, dtype=self.g.dtype)
            return rows.index_add_(0, self.x.reshape(-1), self.g.flatten(0, 1))
        gx = self.g.flatten(0, 1).T @ self.x.flatten(0, 1)  # [out, in]
        return self._as_weight(gx, shape)

    def terms(self, shape: torch.Size) -> Tensor:
        """[n, *shape]: every sample's term (materialised; for tests and small layers)."""
        if self.is_bias or self._norm:
            return self.coef * self._rows.reshape(self.n, *shape)
        if self.kind == EMBEDDING_KIND:
            rows = torch.zeros(self.n * shape[0], *shape[1:], dtype=self.g.dtype)
            at = self.x + shape[0] * torch.arange(self.n)[:, None]  # sample i's rows at i·vocab
            rows.index_add_(0, at.reshape(-1), self.g.flatten(0, 1))
            return self.coef * rows.reshape(self.n, *shape)
        gx = torch.einsum("nto,nti->noi", self.g, self.x)
        return self.coef * self._as_weight(gx, shape)

    def reads(self, gbar: Tensor) -> Tensor:
        """H = G (coef ⊙ ḡ) [n, T, in]: the metric's read of each input row; ⟨term_i, ḡ⟩ = Σ H⊙X
        (Linear-like kinds: an embedding's input is token ids, a norm's is elementwise)."""
        if self.kind == EMBEDDING_KIND:
            raise CreditError(f"{self.param}: embedding {self.module!r} reads token ids, not vectors.")
        return self.g @ self._as_matrix(self.coef * gbar)

    def attribution(self, gbar: Tensor) -> Tensor:
        """[n]: ⟨term_i, ḡ⟩ for every sample."""
        if self.is_bias or self._norm:
            return self._rows @ (self.coef * gbar).reshape(-1)
        if self.kind == EMBEDDING_KIND:  # Σ_T ⟨g_T, (coef ⊙ ḡ)[id_T]⟩: a gather, no [vocab, d]
            return (self.g * (self.coef * gbar)[self.x]).sum((1, 2))
        return (self.reads(gbar) * self.x).sum((1, 2))

    def kernel_shares(self, gbar: Tensor, kernels: Kernels) -> Tensor:
        """[n, K]: ⟨term_i, R_k⟩ for every sample and kernel (they sum to `attribution`)."""
        if self._norm:
            raise self._no_features()
        if self.is_bias:
            return kernels.sample_bias_shares(self.g, self.coef)
        self.check_width(kernels.weight)
        if self.kind == EMBEDDING_KIND:
            return self._embedding_shares(kernels)
        coef = self.coef if not isinstance(self.coef, Tensor) else self._as_matrix(self.coef)
        return kernels.sample_shares(self.g, self.x, coef)

    def _embedding_shares(self, kernels: Kernels) -> Tensor:
        """[n, K]: Σ_T ⟨g_T, (coef ⊙ R_k)[id_T]⟩, gathering kernel rows at the ids (kernels of
        the Linear that shares the weight: an LM head tied to its embedding)."""
        weight = kernels.weight * self.coef  # [K, vocab, d]
        ids, g = self.x.reshape(-1), self.g.flatten(0, 1)  # [n·T], [n·T, d]
        chunk = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[0] * weight.shape[2]))
        parts = [
            torch.einsum("krd,rd->rk", weight[:, ids[s : s + chunk]], g[s : s + chunk])
            for s in range(0, ids.shape[0], chunk)
        ]
        return torch.cat(parts).reshape(self.n, -1, weight.shape[0]).sum(1)

    def summed_kernel_shares(self, gbar: Tensor, kernels: Kernels) -> Tensor:
        """[K]: Σ_i ⟨term_i, R_k⟩ = ⟨Σ_i term_i, R_k⟩, from the block's total (one matmul)."""
        if self._norm:
            raise self._no_features()
        total = self.total(gbar.shape)
        if self.is_bias:
            return kernels.bias_shares(total)
        self.check_width(kernels.weight)
        return kernels.shares(self._as_matrix(total))

    def _no_features(self) -> CreditError:
        return CreditError(
            f"{self.param} is the {'shift' if self.is_bias else 'scale'} of {self.kind} "
            f"{self.module!r}: it is elementwise, so no input features split it; its credit "
            "has whole-sample rows only. Give features at a Linear's input."
        )

    def check_width(self, directions: Tensor) -> None:
        """Refuse features whose width is not this block's input width."""
        if self._norm:
            raise self._no_features()
        if self.kind == EMBEDDING_KIND:
            if directions.ndim == 3 and directions.shape[-1] == self.g.shape[-1]:
                return  # kernels [K, vocab, d] of a tied Linear, in the weight's own layout
            raise CreditError(
                f"{self.param} is read by embedding {self.module!r} from token ids: no feature "
                "directions at its input split it. Give features at a Linear's input (a tied "
                "LM head's features also split the embedding's terms)."
            )
        if directions.shape[-1] != self.x.shape[-1]:
            raise CreditError(
                f"feature directions of width {directions.shape[-1]} do not fit {self.param}, "
                f"whose factor input has width {self.x.shape[-1]} (module {self.module!r}, "
                f"{self.kind}); give directions at this module's input (conv2d: in unfolded "
                "C·kh·kw space)."
            )

    def feature_shares(
        self, gbar: Tensor, directions: Tensor, dual: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """([n, F] shares, [n] off-span share), uncentred; they sum to `attribution` exactly.

        directions: [F, in] unit read directions at the module's input (`dual` is ignored; kept
        for callers of the earlier signature).
        """
        if self.is_bias:
            raise CreditError(f"{self.param} is a bias: it reads no input features.")
        self.check_width(directions)
        names = tuple(str(i) for i in range(directions.shape[0]))
        kernels = read_kernels(names, ("",) * len(names), directions.to(torch.float64),
                               self._as_matrix(gbar))
        shares = self.kernel_shares(gbar, kernels)
        return shares[:, :-1], shares[:, -1]


@dataclass(frozen=True)
class CreditSplit:
    """Step t's update split over samples: `base` (optim_replay), sample blocks, and what the
    blocks do not cover. `leaves()` rebuilds the update exactly."""

    step: int
    base: UpdateSplit
    blocks: list[SampleBlock]
    unresolved: dict[str, Params]  # GRADIENT_UNRESOLVED, MOMENTUM_UNRESOLVED
    # {param: factor modules of it that have no factors at this step} (see CreditSession)
    not_captured: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # {origin step s: {param: ω_s}}: a MOMENTUM block's coef is base.carry[param] · ω_s
    origins: dict[int, dict[str, float]] = field(default_factory=dict)

    def shared_coef(self, b: SampleBlock) -> tuple[Coef, float]:
        """(shared coef, scale) with b.coef == shared · scale: kappa and 1 for this step's
        samples, carry and ω_s for step s's (so all origins of a param share one coef)."""
        if b.part == MOMENTUM:
            return self.base.carry[b.param], self.origins[b.origin_step][b.param]
        return b.coef, 1.0

    def sample_total(self, part: str) -> Params:
        """Σ of the sample terms of `part` (GRADIENT or MOMENTUM), per param."""
        out = {n: torch.zeros_like(v) for n, v in self.base.update.items()}
        for b in self.blocks:
            if b.part == part:
                out[b.param] = out[b.param] + b.total(out[b.param].shape)
        return out

    def leaves(self) -> dict[str, Params]:
        """The six leaves (LEAVES), samples summed; Σ leaves == Δθ."""
        return {
            WEIGHT_DECAY: self.base.parts[WEIGHT_DECAY],
            GRADIENT: self.sample_total(GRADIENT),
            GRADIENT_UNRESOLVED: self.unresolved[GRADIENT_UNRESOLVED],
            MOMENTUM: self.sample_total(MOMENTUM),
            MOMENTUM_UNRESOLVED: self.unresolved[MOMENTUM_UNRESOLVED],
            RESIDUAL: self.base.parts[RESIDUAL],
        }


@dataclass(frozen=True)
class _StepFactors:
    """One step's factors in float64, c folded into G, and its per-sample tags."""

    modules: dict[str, tuple[str, Tensor, Tensor]]  # module -> (kind, X [n,T,in], c·G [n,T,out])
    tags: dict[str, Any]  # name -> 1-D tensor (per sample) or a scalar


class CreditSession:
    """The optimizer replay plus a window of earlier steps' factors, kept for consecutive steps.

    horizon: earlier steps whose samples get momentum credit. None (default): every step whose
    weight has not decayed below `min_weight` (β^{t−1−s} ≥ 1e-2: 99% of the buffer's mass), at
    most `max_horizon` steps. The momentum left beyond the horizon is the `momentum (unresolved)`
    part; its share of ‖Δθ‖ is a ledger row per step (quantity "momentum_unresolved_share").
    """

    def __init__(
        self,
        run: Run,
        *,
        horizon: int | None = None,
        max_horizon: int = MAX_HORIZON,
        min_weight: float = MIN_WEIGHT,
        replay: OptimizerReplay | None = None,
    ) -> None:
        if horizon is not None and horizon < 0:
            raise CreditError(
                f"horizon={horizon} must be >= 0 (earlier steps given momentum credit)."
            )
        self.run = run
        self.horizon = horizon
        self.min_weight = min_weight if horizon is None else 0.0
        self.reach = max_horizon if horizon is None else horizon
        self.replay = replay if replay is not None else OptimizerReplay(run, history=self.reach)
        if self.replay.run is not run:
            raise ReplayError("the OptimizerReplay given belongs to another run; make one per run.")
        self._factors: dict[int, _StepFactors | None] = {}
        # (s, module, param) -> Σ_i layout(g_i, x_i) of step s's samples (SampleBlock.unscaled)
        self._sums: dict[tuple[int, str, str], Tensor] = {}
        # (s, key) -> anything derived from step s's factors alone (`cached`), evicted with them
        self._derived: dict[tuple[int, Any], Any] = {}
        meta = run.manifest.get("factor_modules") or {}
        self._kinds = {m: v.get("kind", "linear") for m, v in meta.items()}
        self._params = {m: {k: v[k] for k in ("weight", "bias") if k in v} for m, v in meta.items()}

    def __repr__(self) -> str:
        return f"CreditSession({self.run!r}, horizon={self.horizon}, reach={self.reach})"

    def param_of(self, module: str, part: str = "weight") -> str | None:
        """The recorded name of a factor module's weight (or bias), None if not a factor module."""
        return self._params.get(module, {}).get(part)

    def kind(self, module: str) -> str:
        """The factor layout of a module: "linear", "conv1d" (HF, in × out) or "conv2d"."""
        return self._kinds.get(module, "linear")

    # -- factors ---------------------------------------------------------------------------
    def factors(self, s: int) -> _StepFactors | None:
        """Step s's factors (cached while s is within reach of the steps asked for)."""
        if s not in self._factors:
            self._factors[s] = self._read_factors(s)
        return self._factors[s]

    def _read_factors(self, s: int) -> _StepFactors | None:
        record = self.run.record(s)
        coef = record.grad_coef
        if record.skipped or coef is None:
            return None
        coef = float(coef) / float(record.grads_scaled_by or 1.0)
        modules = {}
        for module, (x, g) in self.run.factors(s).items():
            n, kind = x.shape[0], self._kinds.get(module, "linear")
            g64 = g.to(torch.float64).reshape(n, -1, g.shape[-1]) * coef  # [n, T, out]
            if kind == EMBEDDING_KIND:
                x64 = _token_ids(x, module, s).reshape(n, -1)  # [n, T]
            elif kind in NORM_KINDS:  # both are per-sample sums of gradient terms: both get c
                x64 = x.to(torch.float64).reshape(n, 1, -1) * coef
                g64 = g64.reshape(n, 1, -1)
            else:
                x64 = x.to(torch.float64).reshape(n, -1, x.shape[-1])  # [n, T, in]
            modules[module] = (kind, x64, g64)
        return _StepFactors(modules, self.run.tags(s))

    def not_captured(self, t: int, gradient: Params) -> dict[str, tuple[str, ...]]:
        """{param: factor modules of it without factors at step t} where step t took factors and
        the param got a gradient: the modules whose part of it was never seen (a fused LM head,
        a broadcast that could not be split, a module that did not run)."""
        factors = self.factors(t)
        if factors is None:
            return {}
        out: dict[str, list[str]] = {}
        for module, params in self._params.items():
            param = params.get("weight")
            if module in factors.modules or param not in gradient:
                continue
            if bool(gradient[param].ne(0).any()):
                out.setdefault(param, []).append(module)
        return {p: tuple(m) for p, m in out.items()}

    def _evict(self, t: int) -> None:
        for s in [s for s in self._factors if s < t - self.reach or s > t]:
            del self._factors[s]
        for key in [k for k in self._sums if k[0] < t - self.reach or k[0] > t]:
            del self._sums[key]
        for key in [k for k in self._derived if k[0] < t - self.reach or k[0] > t]:
            del self._derived[key]

    def cached(self, s: int, key: Any, make: Any) -> Any:
        """`make()`, kept while step s's factors are within reach: for quantities derived from
        step s's samples alone (per-group sums of their terms), reused by every later update."""
        if (s, key) not in self._derived:
            self._derived[(s, key)] = make()
        return self._derived[(s, key)]

    # -- the split -------------------------------------------------------------------------
    def split(self, t: int) -> CreditSplit:
        """Step t's update over samples of step t and, through momentum, of earlier steps."""
        base = self.replay.split(t)
        self._evict(t)
        blocks = self._blocks(t, GRADIENT, base.kappa) if base.kappa else []
        origins = self._origins(base)
        for s, weights in origins.items():
            coefs = {p: base.carry[p] * w for p, w in weights.items()}
            blocks += self._blocks(s, MOMENTUM, coefs)
        for b in blocks:  # each origin's Σ g xᵀ once, shared by every update it enters
            key, shape = (b.origin_step, b.module, b.param), base.update[b.param].shape
            if key not in self._sums and _fits(b, shape.numel()):
                self._sums[key] = b.raw_total(shape)
            if key in self._sums:
                object.__setattr__(b, "unscaled", self._sums[key])
        split = CreditSplit(t, base, blocks, {}, origins=origins)
        grad_sum, mom_sum = split.sample_total(GRADIENT), split.sample_total(MOMENTUM)
        unresolved = {
            GRADIENT_UNRESOLVED: {n: v - grad_sum[n] for n, v in base.parts[GRADIENT].items()},
            MOMENTUM_UNRESOLVED: {n: v - mom_sum[n] for n, v in base.parts[MOMENTUM].items()},
        }
        missing = self.not_captured(t, base.parts[GRADIENT])
        return CreditSplit(t, base, blocks, unresolved, missing, origins)

    def _origins(self, base: UpdateSplit) -> dict[int, dict[str, float]]:
        """{s: {param: ω_s}} for the earlier steps within the horizon."""
        out: dict[int, dict[str, float]] = {}
        for param, entries in base.backflow.items():
            for s, omega, decay in entries:
                if base.step - s > self.reach or decay < self.min_weight:
                    break
                out.setdefault(s, {})[param] = omega
        return out

    def _blocks(self, s: int, part: str, coefs: dict[str, Coef]) -> list[SampleBlock]:
        factors = self.factors(s)
        if factors is None:
            return []
        blocks = []
        for module, (kind, x, g) in factors.modules.items():
            prefix = f"{module}." if module else ""
            for suffix, is_bias in (("weight", False), ("bias", True)):
                # the recorded name (by identity at record time; older runs: the module path)
                param = self._params.get(module, {}).get(suffix, prefix + suffix)
                if param not in coefs:
                    continue
                rows = x if kind in NORM_KINDS and not is_bias else g  # a norm's scale: Σ g ⊙ x̂
                blocks.append(
                    SampleBlock(part, s, module, param, kind, is_bias, x, rows, coefs[param])
                )
        return blocks


def _fits(b: SampleBlock, numel: int) -> bool:
    """Whether a param-sized cache of `numel` elements per origin is no larger than the block's
    factors it summarises (so the session's caches stay within the factors' own memory)."""
    return numel <= b.x.numel() + b.g.numel()


def _token_ids(x: Tensor, module: str, s: int) -> Tensor:
    """An embedding's stored ids as int64; ids cast to a compact float `factor_dtype` are exact
    only up to 2^(mantissa bits + 1) (bfloat16: 256), so larger ones are refused."""
    if not x.is_floating_point():
        return x.long()
    limit = int(2 / torch.finfo(x.dtype).eps)  # 2^(mantissa bits + 1)
    if x.numel() and (bool((x != x.round()).any()) or float(x.abs().max()) > limit):
        raise CreditError(
            f"step {s}: the token ids of embedding {module!r} were stored as {x.dtype} (the run's "
            f"factor_dtype), which holds integers exactly only up to {limit}; they are lost. "
            "Record with factor_dtype=None (or float32) to get credit rows for embeddings."
        )
    return x.long()


def split_update(
    run: Run, t: int, session: CreditSession | None = None, *, horizon: int | None = None
) -> CreditSplit:
    """The exact split of Δθ_t over weight decay, samples, momentum-carried samples and the rest.

    Pass one `session` for consecutive steps (it keeps the replayed optimizer state).
    """
    session = session if session is not None else CreditSession(run, horizon=horizon)
    if session.run is not run:
        raise CreditError("this CreditSession belongs to another run; make one per run.")
    return session.split(t)
