"""Per-sample factors (x_i, g_i) of a model's layers, paired call by call.

For a Linear weight W (out × in) the batch gradient is Σ_i g_i x_iᵀ, with x_i the layer input
and g_i the gradient at its output. A forward hook keeps each call's input and registers a
tensor hook on that call's output, so every input is paired with its own output-gradient even
when the module runs several times per step or a forward pass is never back-propagated.
Embeddings and norms have their own layouts (see `factor_kinds`).

Nothing is left out silently: modules with trainable parameters that chisel takes no factors of
are named in a `FactorsSkippedWarning` when recording starts, and a factor module whose weight
got a gradient in a step without its hook seeing the computation (a trainer computing logits as
`F.linear(h, lm_head.weight)`) is named in one when it first happens.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from chisel.capture.distributed_fsdp import is_sharded, local_tensor, shard_rows
from chisel.capture.factor_calls import Call as _Call
from chisel.capture.factor_calls import catch_broadcasts
from chisel.capture.factor_kinds import (  # noqa: F401  (LINEAR, CONV1D re-exported)
    CONV1D,
    CONV2D,
    EMBEDDING,
    LINEAR,
    NORMS,
    NormSpec,
    factor_kind,
    factor_sketch,
    grad_sketch,
    module_meta,
    norm_spec,
    unsupported_reason,
    verify_embedding,
    verify_norm,
    wrapped_norm,
)
from chisel.errors import FactorsSkippedWarning, UnknownModuleError

# a factor module that did not run while its weight's gradient is not rebuilt by the modules
# that did (relative error of the sketch above this) is reported as not captured
GAP_TOLERANCE = 1e-3
_SEARCH_CALLS = 8  # from the inputs of this many later module calls
SUPPORTED = "nn.Linear, Hugging Face Conv1D, nn.Conv2d (groups=1), nn.Embedding, nn.LayerNorm and RMSNorm"


def _inside_attention(named: dict[str, nn.Module]) -> set[str]:
    """Linear children of nn.MultiheadAttention: its forward uses their weights directly and
    never calls them, so a hook on them never fires."""
    return {
        f"{name}.{child}" if name else child
        for name, module in named.items()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }


def _skipped_note(named: dict[str, nn.Module], chosen: list[tuple[str, nn.Module]],
                  attention: set[str]) -> str | None:
    """Every module that owns trainable parameters no chosen module covers, by name."""
    covered = {id(getattr(m, p)) for _, m in chosen for p in ("weight", "bias")
               if isinstance(getattr(m, p, None), torch.Tensor)}
    skipped = []
    for name, module in named.items():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in covered]
        if not own or name in attention:  # MHA's projections: named with the MHA itself
            continue
        why = unsupported_reason(module)
        skipped.append(f"{name or '<model>'} ({type(module).__name__}{', ' + why if why else ''})")
    if not skipped:
        return None
    return (
        f"factors=True: no per-sample factors for {', '.join(skipped[:8])}"
        + (f" and {len(skipped) - 8} more" if len(skipped) > 8 else "")
        + f" (chisel takes factors of {SUPPORTED}; "
        + ("the projections inside nn.MultiheadAttention are never called as modules; " if attention else "")
        + "their updates are still recorded, and credit for them is reported as "
        "'gradient (unresolved)')."
    )


@dataclass
class FactorCapture:
    """Forward hooks on the chosen modules; `take()` hands over one step's paired factors."""

    model: nn.Module
    selection: bool | tuple[str, ...]
    modules: dict[str, nn.Module] = field(init=False, default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(init=False, default_factory=dict)
    enabled: bool = field(init=False, default=True)
    # {module: steps seen} for factor modules whose weight got a gradient they did not capture
    not_captured: dict[str, int] = field(init=False, default_factory=dict)
    _calls: dict[str, list[_Call]] = field(init=False, default_factory=dict)
    _handles: list[Any] = field(init=False, default_factory=list)
    _probes: dict[int, torch.Tensor] = field(init=False, default_factory=dict)
    _specs: dict[str, NormSpec | None] = field(init=False, default_factory=dict)  # verified
    _checked: set[str] = field(init=False, default_factory=set)  # embeddings verified
    _failed: set[str] = field(init=False, default_factory=set)
    _broadcast: list[tuple[_Call, Any, int]] = field(init=False, default_factory=list)
    _warned: set[str] = field(init=False, default_factory=set)
    _shared: set[int] = field(init=False, default_factory=set)  # weights also used elsewhere
    # under DDP (see `capture.distributed`): every factor term is multiplied by `scale` (1/R), and
    # `reduce` sums a float64 vector over the ranks, so the gradient fit covers the global batch
    scale: float = field(init=False, default=1.0)
    reduce: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        named = dict(self.model.named_modules())
        attention = _inside_attention(named)
        # a norm wrapper (TL bridge) is taken instead of the norm it wraps and never calls
        inner = {id(wrapped_norm(m)) for m in named.values() if wrapped_norm(m) is not None}
        if self.selection is True:
            chosen = [
                (n, m) for n, m in named.items()
                if factor_kind(m) is not None and n not in attention and id(m) not in inner
            ]
            note = _skipped_note(named, chosen, attention)
            if note:
                warnings.warn(note, FactorsSkippedWarning, stacklevel=5)
        else:
            chosen = [(name, self._selected(named, name, attention)) for name in self.selection or ()]
        params = {id(p): n for n, p in self.model.named_parameters()}  # the recorded names
        for name, module in chosen:
            kind = factor_kind(module)
            assert kind is not None
            self.modules[name] = module
            self.meta[name] = module_meta(module, kind, params)
            self._calls[name] = []
        weights = [getattr(m, "weight", None) for m in self.modules.values()]
        mine = {id(w) for w in weights if isinstance(w, torch.Tensor)}
        self._shared = {
            id(p) for n, m in named.items() if n not in self.modules and id(m) not in inner
            for p in m.parameters(recurse=False) if id(p) in mine
        }

    @staticmethod
    def _selected(named: dict[str, nn.Module], name: str, attention: set[str]) -> nn.Module:
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
        module = named[name]
        if factor_kind(module) is None:
            why = unsupported_reason(module)
            raise UnknownModuleError(
                f"factors: module {name!r} is a {type(module).__name__}"
                + (f" with {why}" if why else "")
                + f"; chisel takes factors of {SUPPORTED}."
                + (" Build it without that option, or leave it out." if why else "")
            )
        return module

    def attach(self) -> None:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    # -- the forward hooks -------------------------------------------------------------------
    def _hook(self, name: str):
        calls, kind = self._calls[name], self.meta[name]["kind"]

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if not self.enabled or not torch.is_grad_enabled() or name in self._failed:
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad or not inputs:
                return None
            if self._broadcast:
                self._find_broadcasts(inputs)
            x = inputs[0]
            if kind == EMBEDDING:
                call = self._embedding_call(name, module, x, output)
            elif kind in NORMS:
                call = self._norm_call(name, module, x, output)
            else:
                call = _Call(x.detach(), user_owned=x.grad_fn is None)
            if call is None:
                return None
            calls.append(call)
            output.register_hook(call.set_grad)
            return None

        return hook

    def _embedding_call(self, name: str, module: nn.Module, ids: Any, out: torch.Tensor) -> _Call | None:
        if name not in self._checked:
            if not verify_embedding(module, ids, out):
                return self._fail(name, module, "its output is not the rows of its weight at its "
                                  "first argument (a subclass that offsets, scales or reads "
                                  "something else)")
            self._checked.add(name)
        call = _Call(ids.detach().unsqueeze(-1), user_owned=True, pad=module.padding_idx)
        if ids.ndim >= 1 and ids.shape[0] == 1 and out.grad_fn is not None:
            self._broadcast.append((call, out.grad_fn, 0))  # maybe added to a whole batch later
        return call

    def _norm_call(self, name: str, module: nn.Module, x: Any, out: torch.Tensor) -> _Call | None:
        if name not in self._specs:
            spec = norm_spec(module)
            ok = isinstance(x, torch.Tensor) and spec is not None
            self._specs[name] = verify_norm(module, spec, x.detach(), out.detach()) if ok else None
        spec = self._specs[name]
        if spec is None:
            return self._fail(name, module, "its output is not (γ or 1 + γ) ⊙ x̂ + β for the "
                              "normalised input x̂ chisel computes")
        return _Call(x.detach(), user_owned=False, spec=spec, src=x.detach())

    def _fail(self, name: str, module: nn.Module, why: str) -> None:
        self._failed.add(name)
        self._warned.add(name)
        warnings.warn(
            f"factors: no per-sample factors for {name!r} ({type(module).__name__}): {why}. Its "
            "update is still recorded; credit reports its gradient as 'gradient (unresolved)'.",
            FactorsSkippedWarning,
            stacklevel=3,
        )
        return None

    def _find_broadcasts(self, inputs: tuple) -> None:
        targets = {id(node): call for call, node, _ in self._broadcast}
        catch_broadcasts(inputs, targets)
        # searched from the inputs of the next few modules only: a bounded cost per forward
        self._broadcast = [(c, n, k + 1) for c, n, k in self._broadcast
                           if id(n) in targets and k + 1 < _SEARCH_CALLS]

    # -- per step ------------------------------------------------------------------------------
    def clear(self) -> None:
        for calls in self._calls.values():
            for call in calls:
                for handle in call.handles:
                    handle.remove()
            calls.clear()
        self._broadcast.clear()

    def take(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """This step's back-propagated calls per module; forward-only calls are dropped."""
        out = {}
        for name, calls in self._calls.items():
            # a user's input buffer may be overwritten in place before the writer gets to it;
            # activations made by autograd are fresh tensors nobody writes to again
            pairs = [(c.x.clone() if c.user_owned else c.x, c.g) for c in calls if c.g is not None]
            if self.scale != 1.0 and pairs:
                pairs = self._scaled(name, pairs)
            if pairs:
                out[name] = pairs
        self._drop_unsplit_broadcasts(out)
        self.clear()
        return out

    def _scaled(self, name: str, pairs: list) -> list:
        """Each factor term times `scale`: g for Linear-like and embedding factors; both parts of
        a norm's (Σ g ⊙ x̂, Σ g), which are sums of gradient terms."""
        s = self.scale
        if self.meta[name]["kind"] in NORMS:
            return [(x * s, g * s) for x, g in pairs]
        return [(x, g * s) for x, g in pairs]

    def _drop_unsplit_broadcasts(self, out: dict[str, list]) -> None:
        """An embedding call of batch 1 in a step whose batch is larger, whose per-sample
        gradient was not found, holds the batch's sum: not a sample's. Leave it out, named."""
        batch = max((x.shape[0] for pairs in out.values() for x, _ in pairs if x.ndim > 1), default=1)
        for name in [n for n in out if self.meta[n]["kind"] == EMBEDDING]:
            kept = [(x, g) for x, g in out[name] if x.shape[0] > 1 or batch == 1]
            if len(kept) < len(out[name]):
                self._gap(name, "its ids are broadcast over the batch and chisel could not find the "
                          "add that broadcasts them, so its gradient cannot be split per sample")
            if kept:
                out[name] = kept
            else:
                del out[name]

    def _gap(self, name: str, why: str) -> None:
        self.not_captured[name] = self.not_captured.get(name, 0) + 1
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(
                f"factors: {name!r} ({type(self.modules[name]).__name__}): {why}. That part of "
                "the update is not captured; credit reports it as 'gradient (unresolved)' "
                "(ledger quantity 'not_captured_share'). Warned once per module.",
                FactorsSkippedWarning,
                stacklevel=3,
            )

    # -- the clip coefficient, and gaps --------------------------------------------------------
    def grad_coef(self) -> tuple[float | None, float | None]:
        """(c, relative residual) with `.grad ≈ c · Σ_i (factor term)_i` over the factor weights.

        c folds in gradient clipping and loss-scale unscaling. It is measured on a random
        projection of each weight (O(N·(in+out)) per layer), so it costs no extra matmul. A
        weight tied to several modules (an LM head and its embedding) is rebuilt from all of
        them. A factor module that did not run while its weight got a gradient that the others
        do not rebuild is reported (`not_captured`, a warning) and left out of the fit.
        """
        if not self.enabled:
            return None, None
        sketches = self._sketches()
        if self.reduce is not None:
            self._reduce(sketches)
        silent = {pid for pid, s in sketches.items() if s["silent"]}
        # a weight also used by a module without factors (an LM head's embedding when only the
        # head is taken) is not rebuilt by its factors: it would bias c
        clean = [s for pid, s in sketches.items()
                 if pid not in silent and pid not in self._shared and s["fired"]]
        fit = clean or [s for s in sketches.values() if s["fired"]]
        sharded = any(s.get("rows") is not None for s in sketches.values())
        num, den, gg = self._sums(fit, sharded, lambda s: (
            float(s["grad"] @ s["factors"]), float(s["factors"] @ s["factors"]), float(s["grad"] @ s["grad"])), 3)
        c = num / den if den else None
        for pid in silent:
            s = sketches[pid]
            norm = float(s["grad"].norm())
            if norm == 0.0:
                continue
            rebuilt = s["factors"] * (c or 0.0)
            if float((s["grad"] - rebuilt).norm()) > GAP_TOLERANCE * norm:
                for name in s["silent"]:
                    self._gap(name, "its weight got a gradient in a step where its forward hook "
                              "never saw the computation (e.g. a trainer computing logits with "
                              "F.linear(h, lm_head.weight) instead of calling the module)")
        if c is None:
            return None, None
        (left,) = self._sums(fit, sharded, lambda s: (float((s["grad"] - c * s["factors"]).pow(2).sum()),), 1)
        return c, left**0.5 / max(gg**0.5, 1e-300)

    def _sums(self, fit: list[dict[str, Any]], sharded: bool, terms: Any, width: int) -> list[float]:
        """Σ over `fit` of each of the `width` values `terms(sketch)`. Under FSDP2 a sharded
        weight's sketch covers this rank's rows only: its terms are summed over the ranks too (a
        collective: every rank calls it whenever any weight is sharded)."""
        totals, mine = [0.0] * width, [0.0] * width
        for s in fit:
            target = mine if s.get("rows") is not None else totals
            for i, value in enumerate(terms(s)):
                target[i] += value
        if sharded:
            mine = self.reduce(torch.tensor(mine, dtype=torch.float64)).tolist()
        return [a + b for a, b in zip(totals, mine)]

    def _reduce(self, sketches: dict[int, dict[str, Any]]) -> None:
        """The factors' sketches summed over the ranks (each saw its own samples) and scaled;
        a module that ran on any rank counts as fired. Same weights, same order on every rank:
        their gradients are all-reduced, so the same ones exist everywhere."""
        entries = list(sketches.values())
        fired = torch.tensor([float(bool(e["fired"])) for e in entries], dtype=torch.float64)
        flat = torch.cat([*(e["factors"].reshape(-1).cpu() for e in entries), fired])
        total = self.reduce(flat)
        offset = 0
        for e in entries:
            n = e["factors"].numel()
            e["factors"] = total[offset : offset + n].view_as(e["factors"]).to(e["factors"].device) * self.scale
            offset += n
        for e, any_rank in zip(entries, total[offset:].tolist()):
            if any_rank and not e["fired"]:
                e["fired"], e["silent"] = e["silent"], []
        for e in entries:  # FSDP2: the rows of this rank's piece of the weight
            if e.get("rows") is not None:
                start, n = e["rows"]
                e["factors"] = e["factors"][start : start + n]

    def _sketches(self) -> dict[int, dict[str, Any]]:
        """Per weight (by identity): its gradient's sketch, the factors' sketch, and the factor
        modules sharing it that ran (`fired`) or did not (`silent`) this step."""
        out: dict[int, dict[str, Any]] = {}
        for name, calls in self._calls.items():
            kind = self.meta[name]["kind"]
            weight = getattr(self.modules[name], "weight", None)
            if kind == CONV2D or weight is None or weight.grad is None or name in self._failed:
                continue
            grad, rows, n_rows = weight.grad, None, weight.shape[0] if weight.ndim else 1
            if is_sharded(weight):  # FSDP2: the rank's piece of the gradient, its rows
                grad, rows = local_tensor(grad), shard_rows(weight)
            v = self._probe(weight)
            entry = out.get(id(weight))
            if entry is None:
                sketch = grad_sketch(grad, v).double()
                entry = out[id(weight)] = {"grad": sketch, "rows": rows, "fired": [], "silent": [],
                                           "factors": sketch.new_zeros(n_rows)}
            pairs = [(c.x, c.g) for c in calls if c.g is not None]
            if not pairs:
                entry["silent"].append(name)
                continue
            entry["fired"].append(name)
            for x, g in pairs:
                entry["factors"] += factor_sketch(kind, x, g, v, n_rows).double()
        return out

    def _probe(self, like: torch.Tensor) -> torch.Tensor | None:
        if like.ndim < 2:
            return None
        v = self._probes.get(id(like))
        size = math.prod(like.shape[1:])
        if v is None or v.device != like.device or v.dtype != like.dtype:
            gen = torch.Generator().manual_seed(size)
            v = torch.randn(size, generator=gen, dtype=torch.float64).to(like.device, like.dtype)
            self._probes[id(like)] = v
        return v
