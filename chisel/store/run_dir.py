"""`open_run`: the one entry to a run directory for recording — a new run, an overwritten one or
a resumed one — and the clean-up of a start that failed.

The store decides what is a run (a manifest), refuses to delete or append to anything else,
sweeps the temporary files a killed writer left, removes the remains of a start that was killed
before its manifest was written, and undoes a start that fails (`OpenRun.abandon`). The recorder
only asks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chisel import _names as N
from chisel.errors import NotARunError, RunExistsError
from chisel.store.layout import RunLayout, read_manifest
from chisel.store.manifest import check_manifest
from chisel.store.reader import complete_steps


@dataclass(frozen=True)
class OpenRun:
    """A run directory ready for a recorder.

    first_step: the step number recording continues at (0 for a new run). manifest: the
    resumed run's manifest, None for a new run (the recorder writes it once θ_0 is on disk).
    """

    layout: RunLayout
    first_step: int
    manifest: dict[str, Any] | None
    existed: bool  # the directory existed before open_run

    @property
    def fresh(self) -> bool:
        return self.manifest is None

    def abandon(self) -> None:
        """Undo a failed start of a new run: remove what it made (folders, θ_0, manifest), so a
        retry starts clean. A resumed run is never touched: its recorded steps stay."""
        if self.fresh:
            _remove_start(self.layout.root, existed=self.existed)


def open_run(
    run_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    check_resume: Callable[[dict[str, Any]], None] | None = None,
) -> OpenRun:
    """Prepare `run_dir` for recording.

    A new or empty directory becomes a run; `overwrite=True` replaces an existing run (never a
    directory that is not one, never through a symbolic link); `resume=True` continues a run's
    step numbering (`check_resume(manifest)` may refuse a different model or optimizer).

    Raises:
        RunExistsError: the directory holds a run (and neither option), is a file, is not a run
            (with an option), or both options were given.
        NotARunError: resume=True where there is no run.
    """
    root = Path(run_dir)
    layout = RunLayout(root)
    existed = root.exists()
    is_run = layout.manifest.is_file()
    if root.exists() and not root.is_dir():
        raise RunExistsError(f"run_dir {root} is a file; give a directory path.")
    if overwrite and resume:
        raise RunExistsError("Give either overwrite=True or resume=True, not both.")
    if root.is_dir() and not is_run and _failed_start(root):
        _remove_start(root, existed=True)  # left by a start that was killed: nothing recorded
    if resume and not is_run:
        raise NotARunError(
            f"resume=True, but {root} holds no chisel run to continue ({N.MANIFEST} is "
            "missing). Drop resume=True to start a new run there."
        )
    if root.is_dir() and any(root.iterdir()):
        if resume and is_run:
            manifest = check_manifest(read_manifest(root), layout.manifest)
            if check_resume is not None:
                check_resume(manifest)
            sweep_temporary_files(root)
            return OpenRun(layout, complete_steps(layout), manifest, existed)
        if overwrite and is_run:
            if root.is_symlink():
                raise RunExistsError(
                    f"run_dir {root} is a symbolic link (to {os.path.realpath(root)}); chisel "
                    "will not delete a run through a link. Give the real path, or remove the "
                    "old run yourself."
                )
            shutil.rmtree(root)
        elif overwrite or resume:
            raise RunExistsError(
                f"{root} is not empty and is not a chisel run (no {N.MANIFEST}); chisel will "
                "not delete or append to it. Choose another run_dir."
            )
        else:
            raise RunExistsError(
                f"{root} already holds a run. Pass overwrite=True to replace it, resume=True to "
                "continue its step numbering after a checkpoint reload, or choose another run_dir."
            )
    layout.make_dirs()
    return OpenRun(layout, 0, None, existed)


def sweep_temporary_files(root: Path) -> None:
    """What a killed writer left half-written (never through a link)."""
    for folder in (N.STEPS_DIR, N.KEYFRAMES_DIR):
        path = root / folder
        if path.is_dir() and not path.is_symlink():
            for tmp in path.glob(f"{N.TMP_PREFIX}*"):
                tmp.unlink()


def _remove_start(root: Path, *, existed: bool) -> None:
    """Remove what a start made (the folders and θ_0, the manifest)."""
    for folder in (N.STEPS_DIR, N.KEYFRAMES_DIR):
        path = root / folder
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    (root / N.MANIFEST).unlink(missing_ok=True)
    if not existed:
        with contextlib.suppress(OSError):
            root.rmdir()


def _failed_start(root: Path) -> bool:
    """True for what a start killed before the manifest was written leaves: `steps/` (empty
    but for temporary files) and `keyframes/` (at most θ_0), nothing else."""
    try:
        entries = {p.name: p for p in root.iterdir()}
    except OSError:
        return False
    if not entries or set(entries) - {N.STEPS_DIR, N.KEYFRAMES_DIR}:
        return False
    allowed = {
        N.STEPS_DIR: set(),
        N.KEYFRAMES_DIR: {RunLayout(root).keyframe_file(0).name},
    }
    for name, path in entries.items():
        if not path.is_dir() or path.is_symlink():
            return False
        for child in path.iterdir():
            if not (child.name.startswith(N.TMP_PREFIX) or child.name in allowed[name]):
                return False
    return True
