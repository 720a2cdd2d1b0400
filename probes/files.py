"""FeatureSet on disk: a directory with ``features.json`` and ``features.safetensors``.

``features.json`` holds everything but the vectors: format name and version, the sha256 of the
tensor file, and per feature its name, site, source, bias, metadata, dimension, dtype and
whether it has a write vector. ``features.safetensors`` holds ``read.<i>`` and ``write.<i>``
for feature ``i`` (by position, so any feature name is safe). Floats round-trip exactly: JSON
numbers are written with Python's shortest round-trip repr, tensors keep their dtype.
Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save

from probes.errors import FeatureFileError
from probes.features import SOURCES, Feature, FeatureSet

FORMAT = "probes.FeatureSet"
VERSION = 1
JSON_FILE = "features.json"
TENSOR_FILE = "features.safetensors"
_ENTRY_KEYS = {"name", "site", "source", "bias", "metadata", "dim", "dtype", "has_write"}


def save_feature_set(features: FeatureSet, path: str | Path) -> Path:
    """Write ``features`` into directory ``path`` (created if needed); return the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    entries = []
    for i, feat in enumerate(features):
        tensors[f"read.{i}"] = feat.read.contiguous().cpu()
        if feat.write is not None:
            tensors[f"write.{i}"] = feat.write.contiguous().cpu()
        entries.append(
            {
                "name": feat.name,
                "site": feat.site,
                "source": feat.source,
                "bias": feat.bias,
                "metadata": feat.metadata,
                "dim": feat.dim,
                "dtype": str(feat.read.dtype).removeprefix("torch."),
                "has_write": feat.write is not None,
            }
        )
    blob = save(tensors, metadata={"format": FORMAT})
    header = {
        "format": FORMAT,
        "version": VERSION,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "features": entries,
    }
    _atomic_write(path / TENSOR_FILE, blob)
    _atomic_write(path / JSON_FILE, json.dumps(header, indent=1).encode())
    return path


def load_feature_set(path: str | Path) -> FeatureSet:
    """Read a directory written by :func:`save_feature_set`, validating every field."""
    path = Path(path)
    header = _read_header(path)
    blob = _read_bytes(path / TENSOR_FILE)
    if hashlib.sha256(blob).hexdigest() != header["tensors_sha256"]:
        raise FeatureFileError(
            f"{path / TENSOR_FILE} does not match the checksum in {JSON_FILE}: the tensor file "
            "is corrupted or was replaced. Restore both files from the same save."
        )
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise FeatureFileError(
            f"{path / TENSOR_FILE} is not a valid safetensors file ({err}). Save again."
        ) from None
    features = [_feature(path, i, e, tensors) for i, e in enumerate(header["features"])]
    expected = {f"read.{i}" for i in range(len(features))} | {
        f"write.{i}" for i, e in enumerate(header["features"]) if e["has_write"]
    }
    if set(tensors) != expected:
        extra = sorted(set(tensors) - expected)
        raise FeatureFileError(f"{path / TENSOR_FILE} has tensors not listed in json: {extra}")
    try:
        return FeatureSet(features)
    except ValueError as err:
        raise FeatureFileError(f"{path / JSON_FILE}: {err}") from None


def _read_header(path: Path) -> dict[str, Any]:
    raw = _read_bytes(path / JSON_FILE)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FeatureFileError(
            f"{path / JSON_FILE} is not valid JSON ({err}); it was corrupted or hand-edited. "
            "Fix the syntax or save the FeatureSet again."
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FeatureFileError(f"{path / JSON_FILE} is not a {FORMAT} file (no 'format' field)")
    if header.get("version") != VERSION:
        raise FeatureFileError(
            f"{path / JSON_FILE} has format version {header.get('version')!r}; this version of "
            f"probes reads version {VERSION}. Upgrade probes or re-save the features."
        )
    if not isinstance(header.get("features"), list) or not isinstance(
        header.get("tensors_sha256"), str
    ):
        raise FeatureFileError(f"{path / JSON_FILE}: 'features' list or checksum missing")
    return header


def _feature(path: Path, i: int, entry: Any, tensors: dict) -> Feature:
    where = f"{path / JSON_FILE}, feature #{i}"
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise FeatureFileError(f"{where}: expected keys {sorted(_ENTRY_KEYS)}, found {keys}")
    bias = entry["bias"]
    if not isinstance(bias, (int, float)) or isinstance(bias, bool):
        raise FeatureFileError(f"{where}: bias {bias!r} is not a number")
    if entry["source"] not in SOURCES:
        raise FeatureFileError(f"{where}: source {entry['source']!r} is not one of {SOURCES}")
    read = tensors.get(f"read.{i}")
    write = tensors.get(f"write.{i}") if entry["has_write"] else None
    if read is None or (entry["has_write"] and write is None):
        raise FeatureFileError(f"{where}: its vectors are missing from {TENSOR_FILE}")
    for vec in (read, write):
        if vec is None:
            continue
        if tuple(vec.shape) != (entry["dim"],) or str(vec.dtype) != f"torch.{entry['dtype']}":
            raise FeatureFileError(
                f"{where} ({entry['name']!r}): json says dim {entry['dim']} {entry['dtype']}, "
                f"the tensor file has shape {tuple(vec.shape)} {vec.dtype}. The files disagree: "
                "undo the hand edit or save again."
            )
    if not bool(read.ne(0).any()):
        raise FeatureFileError(
            f"{where} ({entry['name']!r}): its read vector is all zeros, so it reads nothing; the "
            "file was damaged or the feature was saved before it was fitted. Save it again."
        )
    try:
        return Feature(
            name=entry["name"],
            site=entry["site"],
            read=read,
            write=write,
            bias=entry["bias"],
            source=entry["source"],
            metadata=entry["metadata"],
        )
    except (ValueError, TypeError) as err:
        raise FeatureFileError(f"{where}: {err}") from None


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise FeatureFileError(
            f"{file} not found: a saved FeatureSet is a directory holding {JSON_FILE} and "
            f"{TENSOR_FILE}. Pass the directory given to FeatureSet.save."
        ) from None
    except OSError as err:
        raise FeatureFileError(
            f"{file} cannot be read ({err.strerror or err}). Check the path and its permissions."
        ) from None


def _atomic_write(file: Path, data: bytes) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, file)
