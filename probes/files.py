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

FORMAT = "probes.FeatureSet"
VERSION = 1
JSON_FILE = "features.json"
TENSOR_FILE = "features.safetensors"


def write_feature_dir(path: str | Path, entries: list[dict[str, Any]], tensors: dict) -> Path:
    """Write ``features.json`` (the entries + the tensor file's sha256) and
    ``features.safetensors`` into directory ``path`` (created if needed); return the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
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


def read_feature_dir(path: str | Path) -> tuple[list[Any], dict]:
    """The entries of ``features.json`` and the tensors of ``features.safetensors``, with the
    format, version and checksum validated (the entries themselves are checked by the caller)."""
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
    return header["features"], tensors


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
