"""Name SAE latents by the concept they track best: |Pearson correlation| with concept labels.

A latent's activation on state n is its code ``a_n = relu(pre_n)`` (jumprelu: zero unless
``pre_n > threshold``), with ``pre_n = feature.score(x_n) * metadata["encoder_norm"]`` (the
latent's pre-activation, see :meth:`probes.SAE.features`). Its match with a concept labelled
``y_n ∈ {0, 1}`` is the Pearson correlation ``r(a, y)`` (the point-biserial correlation):
``|r| = 1`` only when the latent is on exactly on the concept's states (or exactly off them)
with one magnitude, so it rewards both precision and recall and ignores the activation's scale.
It is computed in float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from probes.errors import FeatureDimensionError, ProbeFitError, ProbesError
from probes.features import Feature, FeatureSet

UNLABELLED = "unlabelled"


def label_latents(
    features: FeatureSet,
    acts: Tensor | Mapping[str, Tensor],
    labels: Mapping[str, Tensor],
    *,
    min_score: float = 0.5,
) -> FeatureSet:
    """Label each SAE latent with its best-matching concept; drop dead latents.

    Args:
        features: SAE latents (``source="sae"``, from :meth:`probes.SAE.features` or
            :func:`probes.train_sae`), standard or jumprelu (topk latents depend on each other
            and are refused).
        acts: ``[n, d]`` activations of the features' site, or ``{site: [n, d]}`` when they
            span several sites. Rows are states.
        labels: ``{concept: [n]}`` binary labels (bool or 0/1) of the same states. A concept
            with one class only matches nothing (its correlation is undefined).
        min_score: a latent whose best ``|r|`` is below this is ``"unlabelled"``.

    Returns:
        The latents active on at least one state, in order, named ``"{sae}{latent}@{site}"``
        (e.g. ``"sae7@hook_obs"``; the feature's own name when it has no ``sae``/``latent``
        metadata), with metadata ``concept`` (the best concept, or ``"unlabelled"``),
        ``concept_score`` (its ``|r|``), ``concept_correlation`` (signed ``r``: negative means
        the latent is on where the concept is off), ``best_concept`` (the best concept even
        when below ``min_score``) and ``active_fraction`` (share of states where it is on).
        Latents never active on ``acts`` are dropped: ``len(features) - len(result)`` of them.

    Raises:
        ProbesError: a feature is not a standard/jumprelu SAE latent, ``min_score`` is not in
            [0, 1], or ``acts`` lacks a feature's site.
        ProbeFitError: shapes disagree or values are not finite.
        FeatureDimensionError: a feature's dimension differs from its site's activations.
    """
    if not 0 <= min_score <= 1:
        raise ProbesError(f"label_latents: min_score must be in [0, 1], got {min_score!r}")
    per_site = _acts_by_site(features, acts)
    n = next(iter(per_site.values())).shape[0] if per_site else 0
    concepts, y = _labels(labels, n)  # [n, C]
    out: list[Feature] = []
    for feat in features:
        a = _activation(feat, per_site[feat.site])  # [n]
        on = a > 0
        if not on.any():
            continue
        r = _correlations(a, y)  # [C]
        best = int(r.abs().argmax()) if len(concepts) else -1
        score = float(r[best].abs()) if best >= 0 else 0.0
        corr = float(r[best]) if best >= 0 else 0.0
        best_name = concepts[best] if best >= 0 and score > 0 else UNLABELLED
        meta = {
            **feat.metadata,
            "concept": best_name if score >= min_score and score > 0 else UNLABELLED,
            "concept_score": score,
            "concept_correlation": corr,
            "best_concept": best_name,
            "active_fraction": on.double().mean().item(),
        }
        out.append(dataclasses.replace(feat, name=_latent_name(feat), metadata=meta))
    return FeatureSet(out)


def _latent_name(feat: Feature) -> str:
    sae, latent = feat.metadata.get("sae"), feat.metadata.get("latent")
    if sae is None or latent is None:
        return feat.name
    return f"{sae}{latent}@{feat.site}"


def _acts_by_site(features: FeatureSet, acts: Any) -> dict[str, Tensor]:
    sites = features.sites
    if isinstance(acts, Mapping):
        missing = [s for s in sites if s not in acts]
        if missing:
            raise ProbesError(f"label_latents: acts has no site {missing}; got {sorted(acts)}")
        given = {s: acts[s] for s in sites}
    else:
        if len(sites) > 1:
            raise ProbesError(
                f"label_latents: the features span sites {sites}; pass acts as {{site: [n, d]}}"
            )
        given = {s: acts for s in sites}
    out, rows = {}, set()
    for site, value in given.items():
        x = torch.as_tensor(value).detach()
        if x.ndim != 2 or not x.is_floating_point():
            raise ProbeFitError(
                f"label_latents: acts at {site!r} must be a float tensor [n, d], got shape "
                f"{tuple(x.shape)} {x.dtype}"
            )
        if not torch.isfinite(x).all():
            raise ProbeFitError(f"label_latents: acts at {site!r} contain NaN or inf")
        out[site] = x.cpu().double()
        rows.add(x.shape[0])
    if len(rows) > 1:
        raise ProbeFitError(f"label_latents: acts of the sites have different rows {sorted(rows)}")
    return out


def _labels(labels: Mapping[str, Tensor], n: int) -> tuple[list[str], Tensor]:
    names, cols = [], []
    for concept, value in labels.items():
        y = torch.as_tensor(value).detach().cpu()
        if y.shape != (n,):
            raise ProbeFitError(
                f"label_latents: labels[{concept!r}] must be [n] = [{n}], got {tuple(y.shape)}"
            )
        y = y.double()
        if not torch.isfinite(y).all() or not ((y == 0) | (y == 1)).all():
            raise ProbeFitError(
                f"label_latents: labels[{concept!r}] must be binary (bool or 0/1); "
                "threshold a continuous target first"
            )
        names.append(str(concept))
        cols.append(y)
    y = torch.stack(cols, 1) if cols else torch.zeros(n, 0, dtype=torch.float64)
    return names, y  # [n, C]


def _activation(feat: Feature, x: Tensor) -> Tensor:
    """The latent's code on each row of ``x [n, d]``: ``[n]``."""
    meta = feat.metadata
    arch = meta.get("architecture")
    if feat.source != "sae" or arch not in ("standard", "jumprelu"):
        raise ProbesError(
            f"label_latents: feature {feat.name!r} is not a standard or jumprelu SAE latent "
            f"(source {feat.source!r}, architecture {arch!r}); label probes by their concept, "
            "and topk latents by running the SAE itself"
        )
    if x.shape[1] != feat.dim:
        raise FeatureDimensionError(
            f"label_latents: feature {feat.name!r} has dimension {feat.dim} but the acts at "
            f"{feat.site!r} have {x.shape[1]}"
        )
    pre = feat.score(x) * float(meta.get("encoder_norm", 1.0))
    if arch == "jumprelu":
        if meta.get("threshold") is None:
            raise ProbesError(f"label_latents: jumprelu latent {feat.name!r} has no threshold")
        return torch.relu(pre) * (pre > float(meta["threshold"]))
    return torch.relu(pre)


def _correlations(a: Tensor, y: Tensor) -> Tensor:
    """Pearson r of ``a [n]`` with each column of ``y [n, C]``; 0 where either is constant."""
    ac = a - a.mean()
    yc = y - y.mean(0)
    denom = ac.norm() * yc.norm(dim=0)  # [C]
    r = (ac @ yc) / denom.where(denom > 0, torch.ones_like(denom))
    return r.where(denom > 0, torch.zeros_like(r))
