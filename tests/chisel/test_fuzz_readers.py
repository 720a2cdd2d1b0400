"""Property-based fuzzing of the readers: any bytes in a manifest, a step file, a keyframe or a
FeatureSet file give a result or chisel's / probes' own error, never another exception."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chisel
import probes
from chisel.errors import ChiselError
from probes.errors import ProbesError
from tests.chisel.test_bad_inputs import _record_pristine

FUZZ = settings(
    max_examples=int(os.environ.get("CHISEL_FUZZ_EXAMPLES", 100)),
    deadline=None,
    derandomize=os.environ.get("CHISEL_FUZZ_RANDOM") is None,  # reproducible unless asked
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def pristine() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield _record_pristine(Path(tmp) / "run")


@pytest.fixture(scope="module")
def work(pristine: Path) -> Iterator[Path]:
    """A scratch copy of the run, restored before each example."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / "run"


def _fresh(pristine: Path, work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    return Path(shutil.copytree(pristine, work))


def _exercise(run_dir: Path, verify: bool = True) -> None:
    """Load and read everything; only chisel's errors may come out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run = chisel.load(run_dir, verify=verify)
        except ChiselError:
            return
        for read in (
            lambda: len(run),
            lambda: run.steps,
            lambda: run.record(2),
            lambda: run.update(2),
            lambda: run.params(2),
            lambda: run.params(3),
            lambda: run.params(5),
            lambda: run.grads(2),
            lambda: run.factors(2),
            lambda: run.tags(2),
            lambda: run.optimizer_state(3),
        ):
            with contextlib.suppress(ChiselError):
                read()


# -- the manifest ---------------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=400))
def test_any_bytes_as_manifest(pristine, work, data):
    run_dir = _fresh(pristine, work)
    (run_dir / "manifest.json").write_bytes(data)
    _exercise(run_dir)


@FUZZ
@given(value=json_values)
def test_any_json_as_manifest(pristine, work, value):
    run_dir = _fresh(pristine, work)
    (run_dir / "manifest.json").write_text(json.dumps(value))
    _exercise(run_dir)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(data=st.data())
def test_one_manifest_field_replaced_by_any_json(pristine, work, data):
    run_dir = _fresh(pristine, work)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    paths = [p for p in _paths(manifest) if (p and p[0] != "model") or p[:2] == ("model", "class")]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(json_values | st.just("__delete__"))
    node = manifest
    for key in path[:-1]:
        node = node[key]
    if value == "__delete__":
        del node[path[-1]]
    else:
        node[path[-1]] = value
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    _exercise(run_dir)


# -- step files and keyframes --------------------------------------------------------------------
FILES = ("steps/000000002.safetensors", "keyframes/000000003.safetensors")


@FUZZ
@given(which=st.sampled_from(FILES), data=st.binary(max_size=600), verify=st.booleans())
def test_any_bytes_as_a_step_file_or_keyframe(pristine, work, which, data, verify):
    run_dir = _fresh(pristine, work)
    (run_dir / which).write_bytes(data)
    _exercise(run_dir, verify)


@FUZZ
@given(
    which=st.sampled_from(FILES),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6),
    cut=st.none() | st.floats(0, 1),
    verify=st.booleans(),
)
def test_damaged_step_files_and_keyframes(pristine, work, which, flips, cut, verify):
    """Bytes flipped anywhere (header, record, checksums, tensor data), or the file cut short."""
    run_dir = _fresh(pristine, work)
    path = run_dir / which
    data = bytearray(path.read_bytes())
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    if cut is not None:
        data = data[: int(cut * len(data))]
    path.write_bytes(bytes(data))
    _exercise(run_dir, verify)


@FUZZ
@given(data=st.data(), verify=st.booleans())
def test_a_step_record_field_replaced_by_any_json(pristine, work, data, verify):
    from tests.chisel.test_bad_inputs import set_record

    run_dir = _fresh(pristine, work)
    path = run_dir / FILES[0]
    chisel.load(run_dir).record(2)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()["record"])
    key = data.draw(st.sampled_from(sorted(record)))
    record[key] = data.draw(json_values)
    set_record(path, json.dumps(record))
    _exercise(run_dir, verify)


# -- FeatureSet files ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_features() -> Iterator[Path]:
    torch.manual_seed(0)
    x = torch.randn(100, 4)
    fs = probes.FeatureSet([
        probes.fit_probe(x, x[:, 0] > 0, name="f", site="s"),
        probes.Feature(name="g", site="s", read=torch.tensor([0.0, 1.0, 0.0, 0.0]),
                       write=torch.ones(4), source="sae"),
    ])
    with tempfile.TemporaryDirectory() as tmp:
        yield fs.save(Path(tmp) / "features")


def _load_features(path: Path) -> None:
    with contextlib.suppress(ProbesError):
        probes.FeatureSet.load(path)


@FUZZ
@given(which=st.sampled_from(["features.json", "features.safetensors"]), data=st.binary(max_size=600))
def test_any_bytes_as_a_feature_file(saved_features, work, which, data):
    shutil.rmtree(work, ignore_errors=True)
    path = Path(shutil.copytree(saved_features, work))
    (path / which).write_bytes(data)
    _load_features(path)


@FUZZ
@given(data=st.data())
def test_one_feature_json_field_replaced_by_any_json(saved_features, work, data):
    shutil.rmtree(work, ignore_errors=True)
    path = Path(shutil.copytree(saved_features, work))
    header = json.loads((path / "features.json").read_text())
    paths = [p for p in _paths(header) if p]
    where = data.draw(st.sampled_from(paths))
    node = header
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = data.draw(json_values)
    (path / "features.json").write_text(json.dumps(header))
    _load_features(path)


@FUZZ
@given(
    which=st.sampled_from(["features.json", "features.safetensors"]),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_damaged_feature_files(saved_features, work, which, flips):
    shutil.rmtree(work, ignore_errors=True)
    path = Path(shutil.copytree(saved_features, work))
    data = bytearray((path / which).read_bytes())
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    (path / which).write_bytes(bytes(data))
    _load_features(path)
