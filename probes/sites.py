"""Sites: named activations of a model, resolved once into :class:`Site` objects.

Grammar
-------
* any ``nn.Module``: ``"<module path>:in"`` (first positional input of the module) or
  ``"<module path>:out"`` (its output), e.g. ``"torso.2:out"``; the root module is ``":in"`` /
  ``":out"``.
* TransformerLens models (``HookedRootModule``, ``TransformerBridge``, anything with a
  ``hook_dict`` of ``HookPoint``s): the hook name, e.g. ``"blocks.0.hook_resid_post"``.
  Legacy aliases a bridge knows are accepted; results stay keyed by the name asked.

``transformer_lens`` is never imported here: hooked models are recognised by duck typing,
so plain PyTorch users do not pay its import time.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from probes.errors import UnknownSiteError

SiteKind = Literal["in", "out", "hook"]
MODULE_SUFFIXES: tuple[str, ...] = (":in", ":out")


@dataclass(frozen=True)
class Site:
    """A resolved site.

    Attributes:
        name: the name the user asked for; results are keyed by it.
        kind: ``"in"`` / ``"out"`` for module sites, ``"hook"`` for a HookPoint.
        target: the module path (module sites) or the canonical hook name (hook sites).
    """

    name: str
    kind: SiteKind
    target: str

    def __post_init__(self) -> None:
        if self.kind not in ("in", "out", "hook"):
            raise ValueError(f"Site.kind must be 'in', 'out' or 'hook', got {self.kind!r}")

    def __str__(self) -> str:
        return self.name


def is_hook_point(module: Any) -> bool:
    """True for TransformerLens ``HookPoint``s (duck typed: ``add_hook`` and ``fwd_hooks``)."""
    return hasattr(module, "add_hook") and isinstance(getattr(module, "fwd_hooks", None), list)


def hook_points(model: nn.Module) -> dict[str, Any]:
    """``{hook name: HookPoint}`` of a TransformerLens model (aliases included), else ``{}``."""
    try:
        hook_dict = getattr(model, "hook_dict", None)
    except Exception:  # a property that fails on a half-built model means: no hooks
        return {}
    if not isinstance(hook_dict, Mapping):
        return {}
    return {name: hp for name, hp in hook_dict.items() if is_hook_point(hp)}


def _module_sites(model: nn.Module, skip_hook_points: bool) -> list[str]:
    names = []
    for path, module in model.named_modules():
        if skip_hook_points and is_hook_point(module):
            continue
        names.extend(path + suffix for suffix in MODULE_SUFFIXES)
    return names


def sites(model: nn.Module) -> list[str]:
    """Every valid site name of ``model``, in model order.

    Hook names come first for TransformerLens models (aliases included), then the module
    sites ``"<path>:in"`` / ``"<path>:out"`` of every submodule (HookPoints excluded: use
    their hook names).

    Example:
        >>> import torch.nn as nn
        >>> sites(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
        [':in', ':out', '0:in', '0:out', '1:in', '1:out']
    """
    hooks = list(hook_points(model))
    return hooks + _module_sites(model, skip_hook_points=bool(hooks))


def resolve_site(model: nn.Module, site: str | Site) -> Site:
    """Resolve a site name against ``model`` into a :class:`Site`.

    Raises:
        UnknownSiteError: no such site; the message lists the closest valid names.
    """
    name = site.name if isinstance(site, Site) else site
    if not isinstance(name, str):
        raise TypeError(f"a site is a string such as 'torso.2:out', got {type(name).__name__}")
    hooks = hook_points(model)
    if name in hooks:
        canonical = getattr(hooks[name], "name", None) or name
        return Site(name=name, kind="hook", target=canonical)
    path, sep, suffix = name.rpartition(":")
    if sep and suffix in ("in", "out"):
        module = _find_module(model, path)
        if module is not None and not (hooks and is_hook_point(module)):
            return Site(name=name, kind=suffix, target=path)  # type: ignore[arg-type]
    raise UnknownSiteError(_unknown_message(model, name))


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` ("" is the model itself)."""
    module = _find_module(model, path)
    if module is None:
        raise UnknownSiteError(f"model has no submodule {path!r}")
    return module


def hook_point_at(model: nn.Module, site: Site) -> Any:
    """The HookPoint of a hook site (looked up by the name asked, which may be an alias)."""
    hooks = hook_points(model)
    hp = hooks.get(site.name, hooks.get(site.target))
    if hp is None:
        raise UnknownSiteError(_unknown_message(model, site.name))
    return hp


def hook_site(model: nn.Module, site: Site, fn: Callable[[Any], Any]) -> Any:
    """Call ``fn(activation)`` at ``site`` on every forward pass; a tensor it returns replaces the
    activation (``None`` keeps it). Returns the handle; the caller removes it.

    A ``":in"`` site is seen in a forward *pre*-hook, before its module runs: an in-place module
    (``nn.ReLU(inplace=True)``) would otherwise have overwritten it by the time a forward hook
    looks. ``":out"`` and hook sites are seen in a forward hook on the module / HookPoint.
    """
    if site.kind == "in":

        def pre(mod: nn.Module, args: tuple) -> tuple | None:
            if not args:
                return None
            value = fn(args[0])
            return None if value is None else (value, *args[1:])

        return module_at(model, site.target).register_forward_pre_hook(pre)
    target = hook_point_at(model, site) if site.kind == "hook" else module_at(model, site.target)
    return target.register_forward_hook(lambda mod, args, output: fn(output))


def _find_module(model: nn.Module, path: str) -> nn.Module | None:
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _unknown_message(model: nn.Module, name: str) -> str:
    valid = sites(model)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
    hint = ""
    if not hook_points(model) and not name.endswith(MODULE_SUFFIXES):
        hint = " Module sites end in ':in' or ':out', e.g. 'torso.2:out'."
    shown = close or valid[:5]
    label = "Closest valid sites" if close else "Some valid sites"
    return (
        f"Unknown site {name!r} for {type(model).__name__}.{hint} "
        f"{label}: {', '.join(repr(s) for s in shown)}. "
        f"List all {len(valid)} with probes.sites(model)."
    )
