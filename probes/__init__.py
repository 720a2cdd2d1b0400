"""probes: sites, activations and features of any PyTorch model.

The lower layer of the project: it imports nothing from ``chisel``.
"""

from probes.capture import capture
from probes.errors import (
    FeatureDimensionError,
    FeatureFileError,
    ProbeFitError,
    ProbesError,
    SiteCaptureError,
    UnknownSiteError,
)
from probes.features import Feature, FeatureSet
from probes.fit import fit_probe
from probes.over_training import probe_over_training
from probes.sae import SAE, load_sae
from probes.sae_label import label_latents
from probes.sae_train import SAEStats, TrainedSAE, train_sae
from probes.sites import Site, resolve_site, sites
from probes.sources import custom, neurons, pca

__all__ = [
    "SAE",
    "Feature",
    "FeatureDimensionError",
    "FeatureFileError",
    "FeatureSet",
    "ProbeFitError",
    "ProbesError",
    "SAEStats",
    "Site",
    "SiteCaptureError",
    "TrainedSAE",
    "UnknownSiteError",
    "capture",
    "custom",
    "fit_probe",
    "label_latents",
    "load_sae",
    "neurons",
    "pca",
    "probe_over_training",
    "resolve_site",
    "sites",
    "train_sae",
]
