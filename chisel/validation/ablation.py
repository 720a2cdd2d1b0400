"""`ablation_effects`: project each feature out of its site, one at a time, and score the model.

Centred projection (default): x ← x − d̂ d̂ᵀ (x − μ), with d̂ the unit read vector and μ the
site's mean activation over `data`. It removes the information along d̂ and keeps the site's mean,
so downstream units are not shifted by −d̂ d̂ᵀ μ (which would hurt whatever d̂ means). Plain
projection (centred=False): x ← x − d̂ d̂ᵀ x.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

import probes
from chisel.attribution.copying import private_copy
from chisel.validation import _common as C
from probes.sites import Site, hook_site

Score = Callable[[nn.Module], Any]  # model -> float or scalar tensor


def ablation_effects(
    model: nn.Module,
    features: C.Features,
    scores: Mapping[str, Score],
    data: Any,
    *,
    centred: bool = True,
    dtype: torch.dtype | None = None,
) -> pd.DataFrame:
    """Each feature projected out of its site alone: how much does each score drop?

    Works at any site `probes` resolves: module sites ("fc2:in", "torso.2:out") and
    TransformerLens HookPoints. The scores run on a deep copy of `model` in eval mode (the
    model passed keeps its parameters, mode and hooks); the copy's hooks are removed in
    `finally`.

    Args:
        model: the trained model.
        features: a non-empty `probes.FeatureSet` (or features).
        scores: {name: `model -> float`}, e.g. {"metric": metric, "return": evaluator}.
        data: inputs (as for `probes.capture`) over which each site's mean μ is taken.
        centred: keep the site's mean along the direction (see the module docstring).
        dtype: cast the copy (e.g. torch.float64 for a metric); None keeps the model's dtype.

    Returns:
        One row per (feature, score): feature, site, concept, score, baseline, ablated,
        effect (= baseline − ablated: positive when the model relies on the feature for the
        score).
    """
    features = C.feature_set(features, "ablation_effects")
    if not isinstance(scores, Mapping) or not scores:
        raise C.ValidationError(
            "ablation_effects: scores must be a non-empty mapping {name: callable(model) -> float}, "
            'e.g. {"metric": metric}.'
        )
    work = private_copy(model).eval()
    if dtype is not None:
        work = work.to(dtype)
    sites = C.resolve_sites(work, features.sites, "ablation_effects")
    inputs = _as_dtype(data, work)
    means = probes.capture(work, inputs, list(sites)) if centred else {}
    baseline = {name: _score(fn, work, name) for name, fn in scores.items()}
    rows = []
    for f in features:
        d = f.read.to(torch.float64) / f.read.to(torch.float64).norm()  # [dim]
        mu = means[f.site].reshape(-1, f.dim).to(torch.float64).mean(0) if centred else None
        with _projected(work, sites[f.site], d, mu):
            ablated = {name: _score(fn, work, name) for name, fn in scores.items()}
        for name in scores:
            rows.append({
                C.FEATURE: f.name, C.SITE: f.site, C.CONCEPT: C.concept(f), C.SCORE: name,
                C.BASELINE: baseline[name], C.ABLATED: ablated[name],
                C.EFFECT: baseline[name] - ablated[name],
            })
    return pd.DataFrame(rows)


def _score(fn: Score, model: nn.Module, name: str) -> float:
    with torch.no_grad():
        return C.scalar(fn(model), f"ablation_effects: score {name!r}")


def _as_dtype(data: Any, model: nn.Module) -> Any:
    """Floating inputs in the copy's dtype (so a float64 copy runs on float32 data)."""
    p = next(model.parameters(), None)
    if p is None:
        return data
    cast = lambda x: x.to(p.dtype) if isinstance(x, Tensor) and x.is_floating_point() else x  # noqa: E731
    if isinstance(data, Mapping):
        return {k: cast(v) for k, v in data.items()}
    if isinstance(data, tuple | list):
        return type(data)(cast(x) for x in data)
    return cast(data)


@contextlib.contextmanager
def _projected(model: nn.Module, site: Site, d: Tensor, mu: Tensor | None):
    """A hook that projects `d` out of the activation at `site`; removed on exit."""

    def project(x: Tensor) -> Tensor:
        dd = d.to(device=x.device, dtype=x.dtype)
        centre = x if mu is None else x - mu.to(device=x.device, dtype=x.dtype)
        return x - (centre @ dd)[..., None] * dd  # [..., dim]

    handle = hook_site(model, site, project)
    try:
        yield
    finally:
        handle.remove()
