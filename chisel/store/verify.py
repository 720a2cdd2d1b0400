"""`chisel verify RUN_DIR`: check every file of a run, and say what is wrong with each.

Checks the manifest against its schema, every step file (readable, its record sound and for
this step, every tensor against its CRC32, θ / gradient vectors of the manifest's sizes), every
keyframe (readable, checksums, one tensor per parameter of the manifest's shape), the step
numbering (a gap, a run with no keyframe) and the steps table built from the records.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from chisel import _names as N
from chisel.errors import ChiselError
from chisel.store.compact import PREFIX as COMPACT_PREFIX
from chisel.store.index import gap_message, visible_steps
from chisel.store.layout import RunLayout, read_manifest, read_meta, read_tensors
from chisel.store.manifest import manifest_problems, record_problems
from chisel.store.shards import is_sharded_run, shard_layout, shard_problems, world_size


@dataclass
class Verification:
    """What `verify_run` found: one line per problem, and what was checked."""

    root: Path
    problems: list[str] = field(default_factory=list)
    steps: int = 0
    keyframes: int = 0
    checksums: bool = True
    """False for a run written before chisel stored checksums (format_version < 3)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        what = f"{self.steps} step files, {self.keyframes} keyframes"
        sums = "" if self.checksums else " (format_version < 3: no checksums to compare)"
        if self.ok:
            return f"chisel verify: {self.root}: OK: manifest, {what} checked{sums}."
        n = len(self.problems)
        return (
            f"chisel verify: {self.root}: {n} problem{'s' * (n != 1)} (checked manifest, {what}{sums}). "
            "Restore the damaged files from a copy, or re-record the run; "
            "`chisel.load(run_dir, verify=False)` reads what is left."
        )


def verify_run(run_dir: str | os.PathLike) -> Verification:
    """Check every file of the run in `run_dir` (see the module docstring)."""
    root = Path(run_dir)
    out = Verification(root)
    layout = RunLayout(root)
    manifest = read_manifest(root)  # missing / not JSON / newer: nothing else can be checked
    problems = manifest_problems(manifest)
    out.problems += [f"{layout.manifest}: {p}" for p in problems]
    if problems:
        return out
    out.checksums = manifest["format_version"] >= N.CHECKSUMS_SINCE
    if is_sharded_run(manifest):  # FSDP2: every rank's sub-run of its pieces is a run
        for r in range(world_size(manifest)):
            sub = verify_run(shard_layout(root, r).root)
            out.problems += sub.problems
            out.steps, out.keyframes = out.steps + sub.steps, out.keyframes + sub.keyframes
        return out
    params = {p["name"]: p for p in manifest["params"]}
    keyframes = layout.numbers(N.KEYFRAMES_DIR)
    out.keyframes = len(keyframes)
    if 0 not in keyframes:
        out.problems.append(f"{layout.keyframe_file(0)}: missing; θ before step 0 cannot be read")
    for k in keyframes:
        out.problems += _keyframe_problems(layout, k, params, out.checksums)
    n, later = visible_steps(layout)
    out.steps = n + len(later)
    if later:
        out.problems.append(gap_message(root, n, later))
    sizes = {}
    for p in manifest["params"]:
        sizes[p["dtype"]] = sizes.get(p["dtype"], 0) + _numel(p["shape"])
    for t in [*range(n), *later]:
        out.problems += _step_problems(layout, t, sizes, out.checksums)
    out.problems += shard_problems(root, manifest, range(n), out.checksums)  # DDP: ranks ≥ 1
    if not out.problems:
        out.problems += _table_problems(root)
    return out


def _numel(shape: list[int]) -> int:
    total = 1
    for s in shape:
        total *= s
    return total


def _keyframe_problems(
    layout: RunLayout, k: int, params: dict[str, dict], require: bool
) -> list[str]:
    path = layout.keyframe_file(k)
    try:
        tensors = read_tensors(path, k, "keyframe", N.PARAM, verify=True, require=require)
        read_tensors(path, k, "keyframe", N.STATE, verify=True, require=require)
    except ChiselError as err:
        return [str(err)]  # names the file
    out = []
    for name, p in params.items():
        value = tensors.get(name)
        if value is None:
            out.append(f"{path}: no tensor for parameter {name!r}")
        elif list(value.shape) != p["shape"] or str(value.dtype) != f"torch.{p['dtype']}":
            out.append(
                f"{path}: parameter {name!r} is {list(value.shape)} {value.dtype}; the manifest "
                f"says {p['shape']} {p['dtype']}"
            )
    return out


def _step_problems(layout: RunLayout, t: int, sizes: dict[str, int], require: bool) -> list[str]:
    path = layout.step_file(t)
    try:
        record = read_meta(path, t, "step", verify=True)
        tensors = read_tensors(path, t, "step", verify=True, require=require)
    except ChiselError as err:
        return [str(err)]  # names the file
    out = [f"{path}: record: {p}" for p in record_problems(record, t)]
    for key, value in tensors.items():
        prefix, _, dtype = key.partition("/")
        if f"{prefix}/" in (N.AFTER, N.DELTA, N.GRAD) and sizes.get(dtype) != value.numel():
            out.append(
                f"{path}: {key} holds {value.numel()} values; the manifest's params give "
                f"{sizes.get(dtype)}"
            )
    if not record.get("skipped") and not any(
        k.startswith((N.AFTER, N.DELTA, COMPACT_PREFIX)) for k in tensors
    ):
        out.append(f"{path}: a step that was not skipped, with no θ ({N.AFTER}/{N.DELTA}) vector")
    return out


def _table_problems(root: Path) -> list[str]:
    from chisel.store.reader import Run

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            steps = Run(root, verify=False).steps
    except ChiselError as err:
        return [f"{root}: the steps table cannot be built: {err}"]
    if "error" in steps:
        bad = steps[steps["error"].notna()]["step"].tolist()
        return [f"{root}: steps table: rows of steps {bad[:10]} cannot be read"]
    if len(steps) and list(steps["step"]) != list(range(len(steps))):
        return [f"{root}: steps table: steps are not numbered 0..{len(steps) - 1}"]
    return []
