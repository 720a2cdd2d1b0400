"""Check a FeatureSet against a model: sites exist and dimensions match."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from torch import nn

from probes.capture import capture
from probes.errors import FeatureDimensionError, ProbesError
from probes.sites import Site, module_at, resolve_site


class _Feature(Protocol):
    name: str
    site: str
    dim: int


class _Features(Protocol):
    """What the check reads of a FeatureSet."""

    sites: list[str]

    def __iter__(self) -> Iterator[_Feature]: ...


def check_features(features: _Features, model: nn.Module, inputs: Any = None) -> None:
    """See :meth:`FeatureSet.check`."""
    resolved = {name: resolve_site(model, name) for name in features.sites}
    dims = {name: _static_dim(model, site) for name, site in resolved.items()}
    unknown = [name for name, d in dims.items() if d is None]
    if unknown and inputs is not None:
        acts = capture(model, inputs, [resolved[name] for name in unknown])
        dims.update({name: acts[name].shape[-1] for name in unknown})
    elif unknown:
        raise ProbesError(
            f"cannot tell the activation dimension at sites {unknown} without running the "
            "model. Pass inputs (one example is enough): features.check(model, inputs)."
        )
    for feat in features:
        if feat.dim != dims[feat.site]:
            raise FeatureDimensionError(
                f"feature {feat.name!r} has dimension {feat.dim} but site {feat.site!r} of "
                f"{type(model).__name__} has dimension {dims[feat.site]}. The feature was made "
                "for another model or site: refit it on this model or fix its site."
            )


def _static_dim(model: nn.Module, site: Site) -> int | None:
    """Last-dim size at a module site when the module type fixes it, else None."""
    if site.kind == "hook":
        return None
    module = module_at(model, site.target)
    if isinstance(module, nn.Linear):
        return module.in_features if site.kind == "in" else module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim if site.kind == "out" else None
    if isinstance(module, nn.LayerNorm | nn.RMSNorm) and module.normalized_shape:
        return module.normalized_shape[-1]
    return None
