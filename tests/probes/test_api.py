"""The public surface of probes, and the layering rule: probes never imports chisel."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import probes

PUBLIC = {
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
}


def test_public_names_are_pinned():
    assert set(probes.__all__) == PUBLIC
    assert all(hasattr(probes, name) for name in PUBLIC)


def test_errors_form_one_hierarchy():
    for name in (
        "UnknownSiteError",
        "FeatureDimensionError",
        "FeatureFileError",
        "ProbeFitError",
        "SiteCaptureError",
    ):
        assert issubclass(getattr(probes, name), probes.ProbesError)
    assert issubclass(probes.ProbesError, ValueError)


def test_probes_source_never_imports_chisel():
    root = Path(probes.__file__).parent
    offenders = []
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{file.name}: {n}" for n in names if n.split(".")[0] == "chisel"]
    assert offenders == []


def test_import_probes_loads_neither_chisel_nor_transformer_lens():
    code = (
        "import sys, probes; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('chisel', 'transformer_lens', "
        "'pandas')]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_docstring_examples_run():
    import doctest
    import importlib

    for name in ("probes.capture", "probes.sites", "probes.sources"):
        module = importlib.import_module(name)  # the package attribute is the function
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, name
