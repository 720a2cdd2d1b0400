"""The package version, in one place (read by the recorder for the manifest)."""

__version__ = "0.1.0"
