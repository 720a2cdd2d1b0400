"""Where each thing lives in a run directory, and how a file becomes visible atomically."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from chisel import _names as N
from chisel.errors import CorruptStepError, NotARunError

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


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, fsync: bool = False
) -> None:
    """Write a safetensors file under a temporary name, then rename it into place."""
    tmp = _atomic_target(path)
    flat = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(flat, str(tmp), metadata={N.RECORD_KEY: json.dumps(meta)})
    _commit(tmp, path, fsync)


def write_json(path: Path, obj: Any, *, fsync: bool = False) -> None:
    tmp = _atomic_target(path)
    tmp.write_text(json.dumps(obj, indent=1))
    _commit(tmp, path, fsync)


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / N.MANIFEST
    if not path.is_file():
        raise NotARunError(
            f"{root} is not a chisel run: {N.MANIFEST} is missing. Give the directory that "
            "`chisel.record(..., run_dir)` wrote."
        )
    return json.loads(path.read_text())


def _corrupt(path: Path, step: int, what: str, err: Exception) -> CorruptStepError:
    return CorruptStepError(
        f"The {what} file of step {step} cannot be read: {path} ({err}). The file is truncated "
        "or corrupted; the other steps of the run stay readable."
    )


def read_meta(path: Path, step: int, what: str) -> dict[str, Any]:
    """The JSON record stored in a safetensors file's metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta[N.RECORD_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise _corrupt(path, step, what, err) from err


def read_tensors(
    path: Path, step: int, what: str, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose key starts with `prefix` (prefix stripped)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)  # noqa: SIM118
            }
    except (SafetensorError, OSError, ValueError) as err:
        raise _corrupt(path, step, what, err) from err
