"""Capture activations at sites: batched, no grad, every hook removed in ``finally``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from probes.errors import SiteCaptureError
from probes.sites import Site, hook_point_at, module_at, resolve_site

Inputs = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
Positions = int | Sequence[int] | None

# Attention patterns / scores are [batch, head, query_pos, key_pos]: position is dim -2.
_PATTERN_SUFFIXES = ("hook_pattern", "hook_attn_scores")


def capture(
    model: nn.Module,
    inputs: Inputs,
    sites: str | Site | Sequence[str | Site],
    *,
    batch_size: int | None = None,
    positions: Positions = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Run ``model`` on ``inputs`` without grad and return the activations at ``sites``.

    Args:
        model: any ``nn.Module``; its train/eval mode is left as is (call ``model.eval()``
            first if dropout or batch-norm statistics matter).
        inputs: a tensor ``[N, ...]``, a tuple of positional tensors or a mapping of keyword
            tensors, all batched along dim 0 with the same ``N``.
        sites: one site or several (see :mod:`probes.sites`).
        batch_size: examples per forward pass; ``None`` runs all ``N`` at once. Results are
            written into preallocated ``[N, ...]`` tensors, so memory stays bounded by one
            batch of the model plus the results.
        positions: for sequence sites (activation with 3+ dims, e.g. ``[batch, pos, d]``):
            ``None`` keeps all positions, an ``int`` picks one (``[batch, d]``), a sequence of
            ints picks several (``[batch, len(positions), d]``). 2-D sites ignore it.
        device: where results are stored; ``None`` keeps the activation's device.

    Returns:
        ``{site name as given: Tensor[N, ...]}``, detached copies.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> capture(net, torch.ones(5, 3), "0:out")["0:out"].shape
        torch.Size([5, 4])
    """
    site_list = [sites] if isinstance(sites, str | Site) else list(sites)
    resolved = list({s.name: s for s in (resolve_site(model, s) for s in site_list)}.values())
    n = _batch_len(inputs)
    step = n if batch_size is None else int(batch_size)
    if step <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return _capture(model, inputs, resolved, n, step, positions, device)


def _capture(
    model: nn.Module,
    inputs: Inputs,
    resolved: list[Site],
    n: int,
    step: int,
    positions: Positions,
    device: torch.device | str | None,
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    window = {"start": 0, "stop": 0}
    fired: dict[str, int] = {}

    def store(site: Site, act: Any, pos_dim: int) -> None:
        if not isinstance(act, Tensor):
            raise SiteCaptureError(
                f"site {site.name!r} produced a {type(act).__name__}, not a tensor. Pick a "
                "submodule or hook whose input/output is a single tensor."
            )
        fired[site.name] = fired.get(site.name, 0) + 1
        if fired[site.name] > 1:
            raise SiteCaptureError(
                f"site {site.name!r} fired more than once in one forward pass (a module called "
                "twice?). Capture a site that runs once per forward, e.g. a wrapper module."
            )
        start, stop = window["start"], window["stop"]
        if act.ndim == 0 or act.shape[0] != stop - start:
            raise SiteCaptureError(
                f"site {site.name!r} has shape {tuple(act.shape)}, whose first dim is not the "
                f"batch ({stop - start}). Only batched activations can be captured."
            )
        act = _select_positions(act, positions, pos_dim)
        if site.name not in out:
            out[site.name] = torch.empty(
                (n, *act.shape[1:]), dtype=act.dtype, device=device or act.device
            )
        buf = out[site.name]
        if buf.shape[1:] != act.shape[1:]:
            raise SiteCaptureError(
                f"site {site.name!r} changed shape between batches: {tuple(buf.shape[1:])} then "
                f"{tuple(act.shape[1:])}. Pad inputs to one length or use batch_size=None."
            )
        buf[start:stop].copy_(act.detach())  # copy now: later in-place ops cannot alter it

    removers = []
    try:
        for site in resolved:
            removers.append(_attach(model, site, store))
        with torch.no_grad():
            for start in range(0, n, step):
                stop = min(start + step, n)
                window.update(start=start, stop=stop)
                fired.clear()
                _call(model, _slice(inputs, start, stop))
                missing = [s.name for s in resolved if s.name not in fired]
                if missing:
                    raise SiteCaptureError(
                        f"sites {missing} did not fire during the forward pass: the module is "
                        "not called by model.forward, or the hook is disabled by the model's "
                        "config (e.g. use_hook_mlp_in). Pick sites that run."
                    )
    finally:
        for remove in reversed(removers):
            remove()
    return {s.name: out[s.name] for s in resolved}


def _attach(model: nn.Module, site: Site, store: Callable[[Site, Any, int], None]) -> Callable:
    """Register one hook for ``site``; return the function that removes exactly it."""
    if site.kind == "hook":
        hp = hook_point_at(model, site)
        pos_dim = (
            hp.pos_dim
            if getattr(hp, "pos_dim", None) is not None
            else (-2 if site.target.endswith(_PATTERN_SUFFIXES) else 1)
        )

        def hook_fn(act: Tensor, hook: Any) -> None:
            store(site, act, pos_dim)

        handle = hp.add_hook(hook_fn, dir="fwd")

        def remove_lens() -> None:
            handle.hook.remove()
            if handle in hp.fwd_hooks:
                hp.fwd_hooks.remove(handle)

        return remove_lens
    module = module_at(model, site.target)
    if site.kind == "in":

        def pre_hook(mod: nn.Module, args: tuple) -> None:
            store(site, args[0] if args else None, 1)

        return module.register_forward_pre_hook(pre_hook).remove

    def fwd_hook(mod: nn.Module, args: tuple, output: Any) -> None:
        store(site, output, 1)

    return module.register_forward_hook(fwd_hook).remove


def _select_positions(act: Tensor, positions: Positions, pos_dim: int) -> Tensor:
    if positions is None or act.ndim < 3:
        return act
    if isinstance(positions, int):
        return act.select(pos_dim, positions)
    index = torch.as_tensor(list(positions), dtype=torch.long, device=act.device)
    return act.index_select(pos_dim % act.ndim, index)


def _batch_len(inputs: Inputs) -> int:
    tensors = _tensors(inputs)
    if not tensors:
        raise ValueError("inputs must contain at least one tensor batched along dim 0")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"all input tensors must share dim 0 (the batch); got sizes {sizes}")
    return sizes.pop()


def _tensors(inputs: Inputs) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    return [v for v in values if isinstance(v, Tensor)]


def _slice(inputs: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(inputs, Tensor):
        return inputs[start:stop]
    if isinstance(inputs, Mapping):
        return {k: v[start:stop] if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return tuple(v[start:stop] if isinstance(v, Tensor) else v for v in inputs)


def _call(model: nn.Module, batch: Inputs) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*batch)
