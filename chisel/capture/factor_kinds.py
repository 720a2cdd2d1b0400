"""Which modules chisel takes per-sample factors of, and what each kind stores per call.

    kind         X per call                      G per call            the weight's gradient
    linear       input [n, …, in]                output grad [n, …, out]   Σ g xᵀ
    conv1d       input [n, …, in]  (HF GPT-2)    output grad [n, …, out]   Σ x gᵀ  (weight in × out)
    conv2d       raw input [n, C, H, W]          output grad [n, out, …]   unfolded on read
    embedding    token ids [n, …, 1] (int)       output grad [n, …, d]     rows g scatter-added at the ids
    layernorm    Σ_tokens g ⊙ x̂  [n, numel]      Σ_tokens g  [n, numel]    γ: Σ_n X, β: Σ_n G
    rmsnorm      Σ_tokens g ⊙ x̂  [n, numel]      Σ_tokens g  [n, numel]    γ: Σ_n X (no β)

A norm's per-sample scale and shift gradients need only these two per-sample sums (x̂ the
normalised input), so they are stored reduced over tokens: exact, and T times smaller than
(x̂, g). Embedding rows at `padding_idx` get no gradient: their G rows are stored as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LINEAR, CONV1D, CONV2D = "linear", "conv1d", "conv2d"
EMBEDDING, LAYERNORM, RMSNORM = "embedding", "layernorm", "rmsnorm"
NORMS = (LAYERNORM, RMSNORM)
MATRIX_KINDS = (LINEAR, CONV1D, CONV2D)


@dataclass(frozen=True)
class NormSpec:
    """How a norm module normalises: x̂ = (x − centre) / sqrt(mean((x − centre)²) + eps) over its
    last `dims` dims, centre = mean x (LayerNorm) or 0 (RMSNorm); out = (offset + γ) ⊙ x̂ + β."""

    centred: bool
    eps: float | None  # None: torch.finfo(x.dtype).eps (nn.RMSNorm's default)
    dims: int
    offset: float = 0.0  # 1.0 for Gemma-style RMSNorm, which scales by (1 + γ)
    compute: torch.dtype | None = None  # float32: the HF RMSNorms compute in it whatever x's dtype

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """x̂, computed in float32 at least (in `compute` if set), returned in x's dtype."""
        dims = tuple(range(-self.dims, 0))
        if self.compute is not None:
            work = x.to(self.compute)
        else:
            work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if self.centred:
            work = work - work.mean(dims, keepdim=True)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return (work * torch.rsqrt(work.pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype)


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, nn.Parameter) else None


def norm_spec(module: nn.Module) -> NormSpec | None:
    """torch's LayerNorm / RMSNorm with an affine scale, and HF/TL-style RMSNorm modules found by
    duck type (class name ends in "RMSNorm", a 1-D `weight`, no bias, an eps attribute). The
    formula is checked against the module's output on its first call (`verify_norm`)."""
    if isinstance(module, nn.LayerNorm):
        if _param(module, "weight") is None:
            return None
        return NormSpec(True, module.eps, len(module.normalized_shape))
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None and isinstance(module, rms):
        if _param(module, "weight") is None:
            return None
        return NormSpec(False, module.eps, len(module.normalized_shape))
    inner = wrapped_norm(module)
    if inner is not None:
        return norm_spec(inner)
    weight = _param(module, "weight")
    if type(module).__name__.lower().endswith("rmsnorm") and weight is not None and weight.ndim == 1:
        if _param(module, "bias") is not None:
            return None
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if isinstance(eps, (int, float)):
            return NormSpec(False, float(eps), 1)
    return None


def wrapped_norm(module: nn.Module) -> nn.Module | None:
    """The norm a wrapper computes itself with the wrapped module's weights (a TransformerLens
    bridge's NormalizationBridge: its `original_component` is never called), else None."""
    try:
        inner = getattr(module, "original_component", None)
    except Exception:  # a bridge component not set up raises
        return None
    if not isinstance(inner, nn.Module) or inner is module or wrapped_norm(inner) is not None:
        return None
    weight = _param(module, "weight")
    if weight is None or weight is not _param(inner, "weight") or norm_spec(inner) is None:
        return None
    return inner


def unsupported_reason(module: nn.Module) -> str | None:
    """Why an Embedding's factors are not taken (None if they are)."""
    if not isinstance(module, nn.Embedding):
        return None
    if module.sparse:
        return "sparse gradients"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq couples the samples of a batch"
    if module.max_norm is not None:
        return "max_norm renormalises its rows in place in the forward pass"
    return None


def factor_kind(module: nn.Module) -> str | None:
    """The factor kind of a module, or None if chisel cannot take its factors."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return CONV2D
    # Hugging Face GPT-2 style Conv1D: weight is (in × out)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        return CONV1D
    if isinstance(module, nn.Embedding) and unsupported_reason(module) is None:
        return EMBEDDING
    spec = norm_spec(module)
    if spec is not None:
        return LAYERNORM if spec.centred else RMSNORM
    return None


def module_meta(module: nn.Module, kind: str, params: dict[int, str]) -> dict[str, Any]:
    """The factor kind, and the recorded names of the module's weight and bias (by identity: a
    module path + ".weight" is not always the parameter's name, e.g. on a TransformerLens bridge,
    and a weight tied to several modules has one name)."""
    meta: dict[str, Any] = {"kind": kind}
    for part in ("weight", "bias"):
        tensor = getattr(module, part, None)
        if isinstance(tensor, torch.Tensor) and id(tensor) in params:
            meta[part] = params[id(tensor)]
    if kind == CONV2D:
        meta.update(
            kernel_size=list(module.kernel_size),
            stride=list(module.stride),
            padding=list(module.padding),
            dilation=list(module.dilation),
        )
    elif kind == EMBEDDING:
        meta.update(num_embeddings=module.num_embeddings, padding_idx=module.padding_idx)
    elif kind in NORMS:
        meta.update(shape=list(module.weight.shape))
    return meta


def verify_norm(module: nn.Module, spec: NormSpec, x: torch.Tensor, out: torch.Tensor) -> NormSpec | None:
    """The spec whose (offset + γ) ⊙ x̂ + β reproduces the module's output (γ or 1 + γ; x̂ in
    x's precision or in float32), or None."""
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(out.dtype, 2e-2)
    bias = getattr(module, "bias", None)
    with torch.no_grad():
        for compute in (None, torch.float32):
            xhat = NormSpec(spec.centred, spec.eps, spec.dims, 0.0, compute).normalise(x)
            for offset in (0.0, 1.0):
                pred = (offset + module.weight) * xhat
                if isinstance(bias, torch.Tensor):
                    pred = pred + bias
                if pred.shape == out.shape and torch.allclose(pred.to(out.dtype), out, rtol=tol, atol=tol):
                    return NormSpec(spec.centred, spec.eps, spec.dims, offset, compute)
    return None


def verify_embedding(module: nn.Module, ids: Any, out: torch.Tensor) -> bool:
    """True when the module's output is the rows of its weight at `ids` (a subclass may add
    offsets, scale the rows or read something else as its first argument)."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        return False
    with torch.no_grad():
        return out.shape == (*ids.shape, module.weight.shape[1]) and torch.equal(
            out, module.weight[ids.long()]
        )


def norm_sums(spec: NormSpec, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_tokens g ⊙ x̂, Σ_tokens g) per sample, each [n, numel of the normalised shape]."""
    lead = x.ndim - spec.dims  # sample dim + token dims before the normalised ones
    xhat = spec.normalise(x)
    if lead == 0:  # an unbatched call: one sample
        xhat, g = xhat[None], g[None]
        lead = 1
    tokens = tuple(range(1, lead))
    gx = (g * xhat).sum(tokens) if tokens else g * xhat
    gs = g.sum(tokens) if tokens else g
    return gx.reshape(gx.shape[0], -1), gs.reshape(gs.shape[0], -1)


# -- sketches of a weight's gradient, for the clip coefficient and the gap check ------------------
def grad_sketch(grad: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """A weight's gradient as [rows] = grad.reshape(rows, -1) @ v (1-D weights: itself)."""
    return grad.reshape(-1) if v is None else grad.reshape(grad.shape[0], -1) @ v


def factor_sketch(
    kind: str, x: torch.Tensor, g: torch.Tensor, v: torch.Tensor | None, rows: int
) -> torch.Tensor:
    """`grad_sketch` of one call's share of the weight's gradient, from its factors alone."""
    if kind in NORMS:
        return x.sum(0)
    d_out = g.shape[-1]
    if kind == LINEAR:  # W [out, in]: Σ g (xᵀ v)
        return g.reshape(-1, d_out).T @ (x.reshape(-1, x.shape[-1]) @ v)
    if kind == CONV1D:  # W [in, out]: Σ x (gᵀ v)
        return x.reshape(-1, x.shape[-1]).T @ (g.reshape(-1, d_out) @ v)
    if kind == EMBEDDING:  # W [vocab, d]: the rows g·v added at the ids
        out = torch.zeros(rows, dtype=g.dtype, device=g.device)
        return out.index_add_(0, x.reshape(-1).long(), g.reshape(-1, d_out) @ v)
    raise ValueError(kind)
