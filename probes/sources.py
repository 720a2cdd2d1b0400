"""Features from neurons, principal components of activations, and custom vectors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from probes.errors import ProbesError
from probes.features import Feature, FeatureSet


def neurons(
    site: str, indices: int | Iterable[int], *, dim: int, prefix: str | None = None
) -> FeatureSet:
    """One-hot features for neurons ``indices`` of a ``dim``-wide site.

    Named ``"{prefix}[{i}]"`` (prefix defaults to the site); read and write are ``e_i``.

    Example:
        >>> neurons("torso.2:out", [0, 5], dim=8).names
        ['torso.2:out[0]', 'torso.2:out[5]']
    """
    idx = [indices] if isinstance(indices, int) else [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < dim]
    if bad:
        raise ProbesError(f"neuron indices {bad} are outside [0, {dim}) at site {site!r}")
    feats = []
    for i in idx:
        e = torch.zeros(dim)
        e[i] = 1.0
        feats.append(
            Feature(
                name=f"{prefix or site}[{i}]",
                site=site,
                read=e,
                write=e,
                source="neuron",
                metadata={"index": i},
            )
        )
    return FeatureSet(feats)


def pca(acts: Tensor, k: int, site: str, *, prefix: str = "pc", center: bool = True) -> FeatureSet:
    """The top-``k`` principal directions of ``acts [n, d]`` as features ``pc0 .. pc{k-1}``.

    Directions are unit eigenvectors of the (float64) covariance, largest variance first, with
    a deterministic sign (largest-magnitude component positive). ``bias = -mean @ v`` so that
    ``score`` gives the centred coordinate. Metadata: ``explained_variance`` and its ratio.
    """
    x = torch.as_tensor(acts).detach()
    if x.ndim != 2 or not x.is_floating_point():
        raise ProbesError(f"pca needs float acts [n, d], got shape {tuple(x.shape)} {x.dtype}")
    n, d = x.shape
    if not 1 <= k <= d or n < 2:
        raise ProbesError(f"pca needs 1 <= k <= d = {d} and n >= 2; got k = {k}, n = {n}")
    mean = x.mean(0, dtype=torch.float64) if center else torch.zeros(d, dtype=torch.float64)
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for xs in x.split(16384):
        xc = xs.double() - mean
        cov += xc.T @ xc
    cov /= n - 1
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    total = evals.clamp_min(0).sum().item()
    feats = []
    for i in range(k):
        v = evecs[:, i]
        v = v * torch.sign(v[v.abs().argmax()])
        feats.append(
            Feature(
                name=f"{prefix}{i}",
                site=site,
                read=v.to(x.dtype),
                write=v.to(x.dtype),
                bias=-float(mean @ v),
                source="pca",
                metadata={
                    "component": i,
                    "explained_variance": evals[i].item(),
                    "explained_variance_ratio": evals[i].item() / total if total else 0.0,
                },
            )
        )
    return FeatureSet(feats)


def custom(
    name: str,
    site: str,
    vector: Tensor,
    *,
    write: Tensor | None = None,
    bias: float = 0.0,
    normalize: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> Feature:
    """A feature from a vector of your own (``[d]``), unit-normalised unless ``normalize=False``.

    Example:
        >>> custom("up", "torso.2:out", torch.tensor([3.0, 4.0])).read
        tensor([0.6000, 0.8000])
    """
    read = _unit(name, "vector", vector) if normalize else torch.as_tensor(vector)
    if write is not None and normalize:
        write = _unit(name, "write", write)
    return Feature(
        name=name,
        site=site,
        read=read,
        write=write,
        bias=bias,
        source="custom",
        metadata=dict(metadata or {}),
    )


def _unit(name: str, what: str, value: Any) -> Tensor:
    vec = torch.as_tensor(value).detach()
    norm = vec.double().norm() if vec.is_floating_point() else torch.tensor(0.0)
    if not vec.is_floating_point() or norm == 0 or not torch.isfinite(norm):
        raise ProbesError(
            f"feature {name!r}: {what} must be a non-zero finite float vector to normalise; "
            "pass normalize=False to keep it as is."
        )
    return vec / norm.to(vec.dtype)
