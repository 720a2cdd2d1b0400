"""Where each thing lives in a run directory, and how a file becomes visible atomically."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from chisel import _names as N
from chisel.errors import CorruptStepError, ManifestError, NotARunError
from chisel.store.filequeue import FileQueue, run_now
from chisel.store.stfile import DirectFiles, crc32, encode_header, ordered, tensor_bytes, write_file

_STEP_FILE = re.compile(rf"^(\d{{{N.STEP_DIGITS}}})\.safetensors$")


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory (see docs/run-format.md)."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / N.MANIFEST

    def _numbered(self, folder: str, step: int) -> Path:
        return self.root / folder / f"{step:0{N.STEP_DIGITS}d}.safetensors"

    def step_file(self, step: int) -> Path:
        return self._numbered(N.STEPS_DIR, step)

    def keyframe_file(self, step: int) -> Path:
        return self._numbered(N.KEYFRAMES_DIR, step)

    def make_dirs(self) -> None:
        for folder in (N.STEPS_DIR, N.KEYFRAMES_DIR):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def numbers(self, folder: str) -> list[int]:
        """Sorted step numbers of the visible files in a folder (temporary files excluded)."""
        try:
            names = os.listdir(self.root / folder)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _STEP_FILE.match(n)))


def _atomic_target(path: Path) -> Path:
    return path.with_name(f"{N.TMP_PREFIX}{path.name}")


def _commit(tmp: Path, path: Path, fsync: bool) -> None:
    if fsync:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)


def checksum(tensor: torch.Tensor) -> int:
    """CRC32 of a tensor's bytes (`stfile.crc32`: hardware-accelerated, GIL released)."""
    return crc32(tensor_bytes(tensor))


def write_tensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    *,
    fsync: bool = False,
    files: DirectFiles | None = None,
    block: Any = None,
    queue: FileQueue | None = None,
    written: Callable[[], None] | None = None,
    release: Callable[[], None] | None = None,
    step: int | None = None,
) -> None:
    """Write a safetensors file under a temporary name, then rename it into place. The record
    and every tensor carry a CRC32 (metadata key `checksums`), verified on read. The bytes go
    out in one write: `files` (O_DIRECT; `block`: see `DirectFiles.write`) or one `writev` of
    the tensors' own memory.

    With `queue`, the checksums and the header are computed here and the write and the rename
    run on the queue's thread (`FileQueue.put`): the tensors' memory must stay untouched until
    `release()` is called there (always, also after a failure); `written()` is called once the
    file is in place. Without it, all of that happens before this returns."""
    tmp = _atomic_target(path)
    flat = ordered(tensors)
    data = {k: tensor_bytes(v) for k, v in flat.items()}
    record = json.dumps(meta)
    sums = {
        "algorithm": N.CHECKSUM_ALGORITHM,
        "record": crc32(record.encode()),
        "tensors": {k: crc32(v) for k, v in data.items()},
    }
    header = encode_header(flat, data, {N.RECORD_KEY: record, N.CHECKSUM_KEY: json.dumps(sums)})
    parts = [header, *data.values()]

    def write() -> None:
        if files is not None:
            files.write(tmp, parts, block)
        else:
            write_file(tmp, parts)
        _commit(tmp, path, fsync)
        if written is not None:
            written()

    (queue.put if queue is not None else run_now)(write, release, step=step)


def write_json(path: Path, obj: Any, *, fsync: bool = False) -> None:
    tmp = _atomic_target(path)
    tmp.write_text(json.dumps(obj, indent=1))
    _commit(tmp, path, fsync)


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest as a JSON object (not yet checked field by field: see `store.manifest`).
    A missing, unreadable or non-JSON manifest, or one from a newer chisel, is a `ManifestError`
    / `NotARunError`."""
    path = Path(root) / N.MANIFEST
    if Path(root).is_dir() and not os.access(root, os.R_OK | os.X_OK):
        raise ManifestError(
            f"{root} cannot be read: permission denied. Fix the directory's permissions."
        )
    if not path.is_file():
        raise NotARunError(
            f"{root} is not a chisel run: {N.MANIFEST} is missing. Give the directory that "
            "`chisel.record(..., run_dir)` wrote."
        )
    try:
        text = path.read_bytes().decode()
    except OSError as err:
        raise ManifestError(
            f"{path} cannot be read ({err.strerror or err}). Check the file's permissions."
        ) from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path} is not text ({err}). " + MANIFEST_FIX) from None
    if not text.strip():
        raise ManifestError(f"{path} is empty. " + MANIFEST_FIX)
    try:
        obj = json.loads(text)
    except ValueError as err:
        raise ManifestError(f"{path} is not valid JSON ({err}). " + MANIFEST_FIX) from None
    if not isinstance(obj, dict):
        raise ManifestError(
            f"{path} holds a JSON {'null' if obj is None else type(obj).__name__}, not an "
            "object. " + MANIFEST_FIX
        )
    version = obj.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > N.FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version {version}: it was written by a newer chisel; this one "
            f"reads versions up to {N.FORMAT_VERSION}. Upgrade chisel (pip install -U chisel-rl)."
        )
    return obj


MANIFEST_FIX = (
    "The manifest was damaged or edited by hand: restore it from a copy of the run, or "
    "re-record; `chisel verify RUN_DIR` lists every problem."
)


def _fix(what: str) -> str:
    return (
        f"The {what} file was damaged after it was written (disk, copy or edit): restore it from "
        "a copy or re-record the run; `chisel verify RUN_DIR` lists every damaged file, and "
        "`chisel.load(run_dir, verify=False)` reads the rest without checking."
    )


def _corrupt(path: Path, step: int, what: str, err: Exception | str) -> CorruptStepError:
    if isinstance(err, PermissionError) or (path.is_file() and not os.access(path, os.R_OK)):
        return CorruptStepError(
            f"The {what} file of step {step} cannot be read: {path}: permission denied. Fix the "
            "file's permissions (e.g. chmod u+r); the file itself may be intact."
        )
    return CorruptStepError(
        f"The {what} file of step {step} cannot be read: {path} ({err}); the other steps of the "
        "run stay readable. " + _fix(what)
    )


def _mismatch(path: Path, step: int, what: str, part: str, stored: Any, found: int) -> CorruptStepError:
    return CorruptStepError(
        f"Step {step}: {part} of the {what} file {path} does not match its checksum "
        f"({N.CHECKSUM_ALGORITHM} stored {stored!r}, read {found}). " + _fix(what)
    )


def _checksums(path: Path, step: int, what: str, meta: dict[str, str]) -> dict[str, Any] | None:
    """The checksums stored in a file's metadata; None when the file has none."""
    raw = meta.get(N.CHECKSUM_KEY)
    if raw is None:
        return None
    try:
        sums = json.loads(raw)
    except ValueError as err:
        raise _corrupt(path, step, what, f"its checksums are not JSON: {err}") from None
    if (
        not isinstance(sums, dict)
        or sums.get("algorithm") != N.CHECKSUM_ALGORITHM
        or not isinstance(sums.get("tensors"), dict)
    ):
        raise _corrupt(path, step, what, f"its checksums are not {N.CHECKSUM_ALGORITHM} checksums")
    return sums


def read_meta(path: Path, step: int, what: str, *, verify: bool = False) -> dict[str, Any]:
    """The JSON record stored in a safetensors file's metadata (checked against its CRC32
    when `verify` and the file has one)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _corrupt(path, step, what, err) from err
    raw = meta.get(N.RECORD_KEY)
    if raw is None:
        raise _corrupt(path, step, what, "its record is missing")
    if verify:
        sums = _checksums(path, step, what, meta)
        if sums is not None and crc32(raw.encode()) != sums.get("record"):
            raise _mismatch(path, step, what, "the record", sums.get("record"), crc32(raw.encode()))
    try:
        record = json.loads(raw)
    except ValueError as err:
        raise _corrupt(path, step, what, f"its record is not JSON: {err}") from err
    if not isinstance(record, dict):
        raise _corrupt(path, step, what, f"its record is a JSON {type(record).__name__}, not an object")
    return record


def read_tensors(
    path: Path, step: int, what: str, prefix: str = "", *, verify: bool = False, require: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose key starts with `prefix` (prefix stripped). With
    `verify`, each is checked against its CRC32; `require` makes a file without checksums an error."""
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            sums = _checksums(path, step, what, f.metadata() or {}) if verify else None
            if verify and require and sums is None:
                raise _corrupt(path, step, what, "it has no checksums, though its run's format has them")
            for key in f.keys():  # noqa: SIM118
                if not key.startswith(prefix):
                    continue
                value = f.get_tensor(key)
                if sums is not None:
                    stored, found = sums["tensors"].get(key), checksum(value)
                    if stored != found:
                        raise _mismatch(path, step, what, f"tensor {key!r}", stored, found)
                out[key[len(prefix) :]] = value
    except CorruptStepError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise _corrupt(path, step, what, err) from err
    return out
