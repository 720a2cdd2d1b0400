"""Per-sample factors (x_i, g_i) of Linear-like layers, paired call by call.

For a Linear weight W (out × in) the batch gradient is Σ_i g_i x_iᵀ, with x_i the layer input
and g_i the gradient at its output. A forward hook keeps each call's input and registers a
tensor hook on that call's output, so every input is paired with its own output-gradient even
when the module runs several times per step or a forward pass is never back-propagated.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from chisel.errors import FactorsSkippedWarning, UnknownModuleError

LINEAR, CONV1D, CONV2D = "linear", "conv1d", "conv2d"


def factor_kind(module: nn.Module) -> str | None:
    """The factor kind of a module, or None if chisel cannot take its factors."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return CONV2D
    # Hugging Face GPT-2 style Conv1D: weight is (in × out)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        return CONV1D
    return None


# layers with a weight matrix whose factors chisel does not take (updates are still recorded)
_NO_FACTORS = (
    nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.MultiheadAttention, nn.Bilinear,
)


def _inside_attention(named: dict[str, nn.Module]) -> set[str]:
    """Linear children of nn.MultiheadAttention: its forward uses their weights directly and
    never calls them, so a hook on them never fires."""
    return {
        f"{name}.{child}" if name else child
        for name, module in named.items()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }


def _skipped_note(named: dict[str, nn.Module], attention: set[str]) -> str | None:
    skipped = [
        f"{n} ({type(m).__name__})"
        for n, m in named.items()
        if n and (isinstance(m, _NO_FACTORS) or (isinstance(m, nn.Conv2d) and factor_kind(m) is None))
    ]
    if not skipped:
        return None
    return (
        f"factors=True: no per-sample factors for {', '.join(skipped[:8])}"
        + (f" and {len(skipped) - 8} more" if len(skipped) > 8 else "")
        + " (chisel takes factors of nn.Linear, Hugging Face Conv1D and nn.Conv2d with groups=1; "
        + ("the projections inside nn.MultiheadAttention are never called as modules; " if attention else "")
        + "their updates are still recorded, and credit for them is reported as residual)."
    )


def _module_meta(module: nn.Module, kind: str, params: dict[int, str]) -> dict[str, Any]:
    """The factor kind, and the recorded names of the module's weight and bias (by identity: a
    module path + ".weight" is not always the parameter's name, e.g. on a TransformerLens bridge)."""
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
    return meta


@dataclass
class _Call:
    """One forward call: its input, and its output-gradient once backward reaches it."""

    x: torch.Tensor
    user_owned: bool  # the input is a tensor of the user's (no grad_fn), which may be reused
    g: torch.Tensor | None = None

    def set_grad(self, grad: torch.Tensor) -> None:
        # a tensor hook must return None, or it would replace the gradient
        self.g = grad.detach()


@dataclass
class FactorCapture:
    """Forward hooks on the chosen modules; `take()` hands over one step's paired factors."""

    model: nn.Module
    selection: bool | tuple[str, ...]
    modules: dict[str, nn.Module] = field(init=False, default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(init=False, default_factory=dict)
    enabled: bool = field(init=False, default=True)
    _calls: dict[str, list[_Call]] = field(init=False, default_factory=dict)
    _handles: list[Any] = field(init=False, default_factory=list)
    _probes: dict[str, torch.Tensor] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        named = dict(self.model.named_modules())
        attention = _inside_attention(named)
        if self.selection is True:
            chosen = [
                (n, m) for n, m in named.items() if factor_kind(m) is not None and n not in attention
            ]
            note = _skipped_note(named, attention)
            if note:
                warnings.warn(note, FactorsSkippedWarning, stacklevel=5)
        else:
            chosen = []
            for name in self.selection or ():
                if name not in named:
                    valid = [n for n, m in named.items() if factor_kind(m) is not None]
                    raise UnknownModuleError(
                        f"factors: the model has no module {name!r}. Modules chisel can take "
                        f"factors of: {valid}."
                    )
                if name in attention:
                    raise UnknownModuleError(
                        f"factors: {name!r} is a projection inside nn.MultiheadAttention, which "
                        "uses its weight directly and never calls it: no hook can see its input. "
                        "Leave it out (its update is still recorded)."
                    )
                if factor_kind(named[name]) is None:
                    raise UnknownModuleError(
                        f"factors: module {name!r} is a {type(named[name]).__name__}; chisel takes "
                        "factors of nn.Linear, Hugging Face Conv1D and nn.Conv2d (groups=1)."
                    )
                chosen.append((name, named[name]))
        params = {id(p): n for n, p in self.model.named_parameters()}  # the recorded names
        for name, module in chosen:
            kind = factor_kind(module)
            assert kind is not None
            self.modules[name] = module
            self.meta[name] = _module_meta(module, kind, params)
            self._calls[name] = []

    def attach(self) -> None:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def _hook(self, name: str):
        calls = self._calls[name]

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if not self.enabled or not torch.is_grad_enabled():
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            x = inputs[0]
            call = _Call(x.detach(), user_owned=x.grad_fn is None)
            calls.append(call)
            output.register_hook(call.set_grad)
            return None

        return hook

    def clear(self) -> None:
        for calls in self._calls.values():
            calls.clear()

    def take(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """This step's back-propagated calls per module; forward-only calls are dropped."""
        out = {}
        for name, calls in self._calls.items():
            # a user's input buffer may be overwritten in place before the writer gets to it;
            # activations made by autograd are fresh tensors nobody writes to again
            pairs = [(c.x.clone() if c.user_owned else c.x, c.g) for c in calls if c.g is not None]
            if pairs:
                out[name] = pairs
        self.clear()
        return out

    def grad_coef(self) -> tuple[float | None, float | None]:
        """(c, relative residual) with `.grad ≈ c · Σ_i g_i x_iᵀ` over the Linear-like weights.

        c folds in gradient clipping and loss-scale unscaling. It is measured on a random
        projection of each weight (O(N·(in+out)) per layer), so it costs no extra matmul.
        """
        num = den = gg = 0.0
        seen = False
        for name, calls in self._calls.items():
            kind = self.meta[name]["kind"]
            weight = getattr(self.modules[name], "weight", None)
            if kind == CONV2D or weight is None or weight.grad is None:
                continue
            pairs = [(c.x, c.g) for c in calls if c.g is not None]
            if not pairs:
                continue
            d_in = weight.shape[1] if kind == LINEAR else weight.shape[0]
            v = self._probe(name, d_in, weight)
            grad_v = weight.grad @ v if kind == LINEAR else v @ weight.grad  # [out]
            r_v = sum(g.reshape(-1, g.shape[-1]).T @ (x.reshape(-1, d_in) @ v) for x, g in pairs)
            grad_v, r_v = grad_v.double(), r_v.double()
            num += float(grad_v @ r_v)
            den += float(r_v @ r_v)
            gg += float(grad_v @ grad_v)
            seen = True
        if not seen or den == 0.0:
            return None, None
        c = num / den
        resid = max(gg - 2 * c * num + c * c * den, 0.0) ** 0.5 / max(gg**0.5, 1e-300)
        return c, resid

    def _probe(self, name: str, size: int, like: torch.Tensor) -> torch.Tensor:
        v = self._probes.get(name)
        if v is None or v.device != like.device or v.dtype != like.dtype:
            gen = torch.Generator().manual_seed(size)
            v = torch.randn(size, generator=gen, dtype=torch.float64).to(like.device, like.dtype)
            self._probes[name] = v
        return v
