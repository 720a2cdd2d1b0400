"""Which weights read or write which sites, and which features apply to which weights.

A Linear-like weight W (out × in) reads the activation at its module's input and writes the one
at its output. A feature may live at any site that carries the *same tensor*: the HookPoint whose
output feeds the next Linear, the activation module before it, `"fc2:in"` itself. One forward pass
of the metric with hooks finds these identities (same storage, offset, shape and strides).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import probes
from chisel.errors import ChiselError
from probes.sites import Site, hook_site, module_at


class FeatureSiteError(ChiselError, ValueError):
    """A feature's site is not read or written by any weight the engine can attribute to."""


@dataclass(frozen=True)
class LinearWeight:
    """A Linear-like module: its weight (as out × in), bias and the sites it reads and writes."""

    module: str
    param: str  # "fc2.weight"
    bias: str | None  # "fc2.bias"
    transposed: bool  # Hugging Face Conv1D stores in × out
    d_in: int
    d_out: int
    in_sites: tuple[str, ...] = field(default=())
    out_sites: tuple[str, ...] = field(default=())

    @property
    def in_site(self) -> str:
        return f"{self.module}:in"

    @property
    def out_site(self) -> str:
        return f"{self.module}:out"

    def matrix(self, tensor: Tensor) -> Tensor:
        """The weight (or its update) as [out, in]."""
        return tensor.T if self.transposed else tensor


def param_names_by_identity(model: nn.Module, recorded: set[str]) -> dict[int, str]:
    """{id(parameter): its recorded name}. A run records `named_parameters()` names, which need not
    be the module paths (a TransformerLens bridge lists `layers.0…` params under `blocks.0…`
    modules), and a tied weight has one recorded name for every module that uses it."""
    out: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in recorded:
            out.setdefault(id(p), name)
    return out


def linear_weights(model: nn.Module, recorded: set[str]) -> list[LinearWeight]:
    """Every nn.Linear / HF Conv1D whose weight is a recorded parameter, found by identity.

    A weight tied to several Linear modules (rare) is bound to the first; a Linear whose weight
    is tied to an Embedding (an LM head) is bound by its own module, under the recorded name.
    """
    names = param_names_by_identity(model, recorded)
    out, seen = [], set()
    for name, module in model.named_modules():
        conv1d = type(module).__name__ == "Conv1D" and hasattr(module, "nf")
        if not (isinstance(module, nn.Linear) or conv1d):
            continue
        w = module.weight
        param = names.get(id(w))
        if param is None or param in seen:
            continue
        seen.add(param)
        d_out, d_in = (w.shape[1], w.shape[0]) if conv1d else (w.shape[0], w.shape[1])
        b = getattr(module, "bias", None)
        bias = names.get(id(b)) if isinstance(b, Tensor) else None
        out.append(LinearWeight(name, param, bias, conv1d, d_in, d_out))
    return out


def _view_key(t: Tensor) -> tuple:
    """Same memory *and* same version: an in-place op (nn.ReLU(inplace=True)) keeps the storage
    but bumps the version counter, so `"0:out"` (before the ReLU) is not `"2:in"` (after it)."""
    try:
        version = t._version
    except RuntimeError:  # inference tensors keep no version counter
        version = None
    storage = t.untyped_storage().data_ptr()
    return (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), version)


class SiteWatch:
    """Forward hooks that note which tensor each site and each weight's input/output is (same
    storage, offset, shape, strides and version), during whatever forward pass runs next.

    Whoever makes it owns its hooks: call `remove()` (in a `finally`).
    """

    def __init__(self, model: nn.Module, sites: list[Site], weights: list[LinearWeight]) -> None:
        self.site_keys: dict[str, tuple] = {}
        self.weight_keys: dict[str, tuple] = {}
        self._alive: list[Tensor] = []  # freed activations would let addresses be reused
        self._handles: list[Any] = []
        try:
            for site in sites:  # ':in' sites are seen before their module runs (in-place ops)
                self._handles.append(hook_site(model, site, self._on_site(site)))
            for w in weights:
                self._handles.append(module_at(model, w.module).register_forward_hook(self._on_weight(w)))
        except BaseException:
            self.remove()
            raise

    def _on_site(self, site: Site):
        def note(value: Any) -> None:
            if isinstance(value, Tensor) and site.name not in self.site_keys:
                self._alive.append(value)
                self.site_keys[site.name] = _view_key(value)

        return note

    def _on_weight(self, w: LinearWeight):
        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            if w.module not in self.weight_keys:
                self._alive.extend((args[0], output))
                self.weight_keys[w.module] = (_view_key(args[0]), _view_key(output))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._alive.clear()

    def bound(self, weights: list[LinearWeight], feature_sites: list[str]) -> list[LinearWeight]:
        """The weights with the sites that carry their input or output tensor filled in."""
        out = []
        for w in weights:
            keys = self.weight_keys.get(w.module)
            ins = tuple(s for s, k in self.site_keys.items() if keys and k == keys[0])
            outs = tuple(s for s, k in self.site_keys.items() if keys and k == keys[1])
            # the module's own sites always count, even if the metric never ran the module
            ins = tuple(dict.fromkeys((*ins, *(s for s in feature_sites if s == w.in_site))))
            outs = tuple(dict.fromkeys((*outs, *(s for s in feature_sites if s == w.out_site))))
            out.append(LinearWeight(w.module, w.param, w.bias, w.transposed, w.d_in, w.d_out, ins, outs))
        return out


def bind_sites(
    model: nn.Module,
    weights: list[LinearWeight],
    feature_sites: list[str],
    run_forward,
    *,
    check: bool = True,
) -> list[LinearWeight]:
    """Fill in, for every weight, the feature sites that carry its input or output tensor.

    check: raise `FeatureSiteError` for a site no weight reads or writes (see `check_bound`).
    """
    resolved = [probes.resolve_site(model, s) for s in dict.fromkeys(feature_sites)]
    watch = SiteWatch(model, resolved, weights)
    try:
        with torch.no_grad():
            run_forward()
    finally:
        watch.remove()
    bound = watch.bound(weights, feature_sites)
    if check:
        check_bound(bound, feature_sites)
    return bound


def check_bound(bound: list[LinearWeight], feature_sites: list[str], carried: set[str] = frozenset()) -> None:
    """Every feature site is read or written by a weight (or `carried` back through an activation)."""
    covered = {s for w in bound for s in (*w.in_sites, *w.out_sites)} | set(carried)
    missing = [s for s in dict.fromkeys(feature_sites) if s not in covered]
    if missing:
        usable = [s for w in bound for s in (w.in_site, w.out_site)]
        hints = {m: difflib.get_close_matches(m, usable, n=3, cutoff=0.0) for m in missing}
        raise FeatureSiteError(
            "No Linear weight reads or writes the features at "
            + ", ".join(f"{m!r} (closest: {hints[m]})" for m in missing)
            + f". Put features at a site that a weight reads or writes, e.g. one of {usable[:12]}; "
            "a site after a nonlinearity is read by the next Linear (its ':in')."
        )
