"""One param's terms from the n samples of one step (a `SampleBlock`), and their inner products
with the metric's gradient and with feature kernels, computed from the factors (g_i, x_i)
without materialising per-sample terms (see `credit` for the mathematics)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from chisel.attribution.credit_parts import CreditError
from chisel.attribution.optim_replay import Coef
from chisel.attribution.splits import _CHUNK_ELEMENTS, Kernels, read_kernels
from chisel.capture.factor_kinds import EMBEDDING as EMBEDDING_KIND
from chisel.capture.factor_kinds import NORMS as NORM_KINDS


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



def _fits(b: SampleBlock, numel: int) -> bool:
    """Whether a param-sized cache of `numel` elements per origin is no larger than the block's
    factors it summarises (so the session's caches stay within the factors' own memory)."""
    return numel <= b.x.numel() + b.g.numel()
