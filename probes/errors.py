"""Errors raised by ``probes``: each message says what is wrong and how to fix it."""

from __future__ import annotations


class ProbesError(ValueError):
    """Base class of every error ``probes`` raises on bad input."""


class UnknownSiteError(ProbesError, KeyError):
    """A site name matches no activation of the model."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SiteCaptureError(ProbesError):
    """A site exists but its activation could not be captured (never fired, not a tensor, ...)."""


class FeatureDimensionError(ProbesError):
    """A feature's dimension differs from the activation dimension at its site."""


class FeatureFileError(ProbesError):
    """A saved FeatureSet or SAE file is missing, corrupted or inconsistent."""


class ProbeFitError(ProbesError):
    """Activations and labels cannot be used to fit a probe (shapes, one class, ...)."""
