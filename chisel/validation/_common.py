"""Shared pieces of the validation stage: its error, column names, input checks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

import probes
from chisel.errors import ChiselError

# columns of the tables this stage returns (and of the demo's validation.parquet)
PATHWAY, FEATURE, SITE, PARAM, CONCEPT, KIND = "pathway", "feature", "site", "param", "concept", "kind"
EFFECT = "effect"  # m(final) − m(final with the pathway reverted)
METRIC_FINAL, METRIC_WITHOUT, METRIC_REVERTED = "metric_final", "metric_without", "metric_all_reverted"
MEMBERS = "members"  # pathways reverted together (1 for a single pathway)
SHAPLEY, SHAPLEY_SE = "shapley", "shapley_se"
SCORE, BASELINE, ABLATED = "score", "baseline", "ablated"
ATTRIBUTION, REMOVAL = "attribution", "removal"
ABLATION_PREFIX = "ablation_"  # validation_table: one column per ablation score

# pathway kinds
KIND_FEATURE, KIND_GROUP = "feature", "group"
NOT_FEATURE_KINDS = ("<mean>", "<residual>", "<bias>")

# a read vector shorter than this is refused: its unit direction would be noise
MIN_READ_NORM = 1e-10

Features = probes.FeatureSet | Iterable[probes.Feature] | probes.Feature | None


class ValidationError(ChiselError, ValueError):
    """The inputs of a validation function do not fit together (sites, features, metric)."""


def feature_set(features: Features, what: str) -> probes.FeatureSet:
    """A non-empty FeatureSet whose read vectors all have a usable norm."""
    if features is None:
        features = probes.FeatureSet([])
    elif isinstance(features, probes.Feature):
        features = probes.FeatureSet([features])
    elif not isinstance(features, probes.FeatureSet):
        features = probes.FeatureSet(list(features))
    if not len(features):
        raise ValidationError(
            f"{what}: the feature set is empty, so there is nothing to revert or ablate. Pass the "
            "features you attributed (e.g. probes.FeatureSet.load(run_dir / 'features'))."
        )
    for f in features:
        norm = float(f.read.double().norm())
        if not norm > MIN_READ_NORM:
            raise ValidationError(
                f"{what}: feature {f.name!r} at {f.site!r} has a read vector of norm {norm:.3g}; "
                f"a direction needs norm > {MIN_READ_NORM:g}. Drop the feature or refit it (a "
                "probe on a constant label, or a dead SAE latent, gives a zero vector)."
            )
    return features


def resolve_sites(model: nn.Module, sites: Iterable[str], what: str) -> dict[str, probes.Site]:
    """{site name: Site}; an unknown site is a ValidationError naming the closest valid ones."""
    out = {}
    for name in dict.fromkeys(sites):
        try:
            out[name] = probes.resolve_site(model, name)
        except probes.UnknownSiteError as err:
            raise ValidationError(f"{what}: {err}") from err
    return out


def scalar(value: object, what: str) -> float:
    """A finite Python float from a scalar tensor or number; else a ValidationError."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValidationError(
                f"{what} returned a tensor of shape {tuple(value.shape)}; it must return a scalar "
                "(reduce with .mean() or .sum())."
            )
        value = float(value.detach())
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValidationError(f"{what} returned {type(value).__name__}; it must return a scalar.") from None
    if not torch.isfinite(torch.tensor(out)):
        raise ValidationError(f"{what} returned {out}; it must be finite.")
    return out


def concept(feature: probes.Feature) -> str:
    return str(feature.metadata.get("concept", ""))
