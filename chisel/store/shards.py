"""The per-rank shards of a run recorded by a distributed (DDP) job.

Rank 0 writes the run as a single process would (manifest, keyframes, one step file per step
with θ, gradients, and its own samples' factors and tags). Every other rank r writes, per step,
a shard holding only its samples' factors and tags, in the step-file format:

    <run>/ranks/<r>/steps/<step>.safetensors     (r = 1 … R−1; written, then renamed into place)

The manifest's `distributed` entry names the world size. `Run.factors(t)` and `Run.tags(t)`
concatenate rank 0's step file and the shards in rank order, so the samples of the global batch
appear in rank order; the update needs rank 0's file only. A shard not (yet) on disk makes
`factors(t)` / `tags(t)` raise `MissingShardError` naming the rank and the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from chisel import _names as N
from chisel.capture.distributed import RankInfo, broadcast_json
from chisel.capture.packet import Keyframe, StepPacket
from chisel.errors import (
    ChiselError,
    CorruptStepError,
    MissingShardError,
    NotARunError,
    ResumeMismatchError,
    RunExistsError,
    TagError,
    WriterError,
)
from chisel.store.layout import RunLayout, read_meta, read_tensors
from chisel.store.run_dir import OpenRun, open_run

RANKS_DIR = "ranks"  # <run>/ranks/<r>/steps/… : the shards of rank r ≥ 1
DISTRIBUTED = "distributed"  # the manifest entry: {"world_size", "backend", "factor_scale"}
_ERRORS: dict[str, type[ChiselError]] = {
    e.__name__: e for e in (RunExistsError, NotARunError, ResumeMismatchError, WriterError)
}


def shard_layout(root: str | os.PathLike, rank: int) -> RunLayout:
    """The folder rank `rank` (≥ 1) writes its shards to, laid out as a run's steps."""
    return RunLayout(Path(root) / RANKS_DIR / str(rank))


def world_size(manifest: dict[str, Any]) -> int:
    """Ranks that recorded the run (1 for a single-process run)."""
    entry = manifest.get(DISTRIBUTED) or {}
    return int(entry.get("world_size", 1))


# -- recording ------------------------------------------------------------------------------------
def open_rank(
    run_dir: str | os.PathLike,
    info: RankInfo,
    *,
    overwrite: bool = False,
    resume: bool = False,
    check_resume: Callable[[dict[str, Any]], None] | None = None,
) -> OpenRun:
    """`open_run` for one rank of a distributed job; every rank calls it (it is collective).

    Rank 0 opens (creates, overwrites or resumes) the run; the others wait for its answer, so
    none writes into a directory rank 0 is about to replace, then take their shard folder. A
    refusal on rank 0 (the run exists, say) is raised on every rank, none is left waiting."""
    if info.writes_run:
        try:
            opened = open_run(run_dir, overwrite=overwrite, resume=resume, check_resume=check_resume)
        except BaseException as err:
            kind = type(err).__name__ if type(err).__name__ in _ERRORS else "WriterError"
            broadcast_json(info, {"error": kind, "message": str(err)})
            raise
        broadcast_json(info, {"first_step": opened.first_step})
        return opened
    answer = broadcast_json(info, None)
    if "error" in answer:
        raise _ERRORS[answer["error"]](f"rank 0 could not open the run: {answer['message']}")
    layout = shard_layout(run_dir, info.rank)
    existed = layout.root.exists()
    (layout.root / N.STEPS_DIR).mkdir(parents=True, exist_ok=True)
    for tmp in (layout.root / N.STEPS_DIR).glob(f"{N.TMP_PREFIX}*"):  # a killed writer's
        tmp.unlink()
    return OpenRun(layout, int(answer["first_step"]), {}, existed)


def shard_packet(item: StepPacket | Keyframe) -> StepPacket | None:
    """What a rank ≥ 1 writes of a step: its samples' factors and tags and the record, without
    θ, gradients, optimizer state or keyframes (rank 0 writes those once). None for a keyframe."""
    if isinstance(item, Keyframe):
        return None
    return replace(item, after=None, grads=None, state=None, keyframe=None, region=None)


# -- reading --------------------------------------------------------------------------------------
def read_shard(
    root: Path, rank: int, t: int, prefix: str, *, verify: bool, require: bool
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Rank `rank`'s shard of step t: its record (the JSON object, as in a step file) and its
    tensors under `prefix`."""
    path = shard_layout(root, rank).step_file(t)
    if not path.is_file():
        raise MissingShardError(
            f"Step {t}: the shard of rank {rank} ({path}) is missing, so the factors and tags of "
            f"its samples are not on disk (the update of step {t} is). Either rank {rank}'s writer "
            "has not written it yet (the run is still being recorded: reload later), or rank "
            f"{rank} was stopped before it did (the step's factors cannot be recovered: attribute "
            "without credit for this step, or re-record)."
        )
    record = read_meta(path, t, f"rank {rank} shard", verify=verify)
    tensors = read_tensors(path, t, f"rank {rank} shard", prefix, verify=verify, require=require)
    return record, tensors


def merge_tags(parts: list[tuple[dict[str, Any], int]], t: int) -> dict[str, Any]:
    """One step's tags over the ranks: per-sample tags concatenated in rank order; a scalar
    that every rank gave alike stays a scalar, one that differs becomes per-sample (each rank's
    value repeated over its samples).

    parts: per rank, (its tags, its number of samples)."""
    names = list(dict.fromkeys(k for tags, _ in parts for k in tags))
    out: dict[str, Any] = {}
    for name in names:
        values = [tags.get(name) for tags, _ in parts]
        if any(v is None for v in values):
            missing = [r for r, v in enumerate(values) if v is None]
            raise TagError(
                f"Step {t}: tag {name!r} was given on some ranks but not on rank(s) {missing}, so "
                "it does not cover the global batch. Call rec.tag(...) with the same names on "
                "every rank."
            )
        if not any(isinstance(v, (torch.Tensor, list)) for v in values) and all(v == values[0] for v in values):
            out[name] = values[0]
            continue
        pieces: list[Any] = []
        for (_, n), v in zip(parts, values):
            if isinstance(v, (torch.Tensor, list)):
                pieces.append(v)
            else:  # this rank's scalar, for each of its samples
                pieces.append(torch.full((n,), v, dtype=torch.float64 if isinstance(v, float) else None))
        if all(isinstance(p, list) for p in pieces):
            out[name] = [s for p in pieces for s in p]
        elif any(isinstance(p, list) for p in pieces):
            raise TagError(
                f"Step {t}: tag {name!r} holds strings on some ranks and numbers on others; give "
                "it the same kind of value on every rank."
            )
        else:
            out[name] = torch.cat(pieces)
    return out


def samples(batch_sizes: Any, tags: dict[str, Any]) -> int:
    """A rank's number of samples at a step: its per-sample tags' length, else its batch size."""
    lengths = [len(v) for v in tags.values() if isinstance(v, (torch.Tensor, list))]
    return lengths[0] if lengths else sum(batch_sizes or ())


def reassemble(pieces: list[torch.Tensor], spec: dict[str, Any], name: str = "parameter") -> torch.Tensor:
    """The full tensor from its ranks' local shards (in rank order), cut as `shard_spec` says.

    pieces: rank r's local shard, [chunk_r, ...] along the shard dim (FSDP2: `torch.chunk`
    over the ranks, trailing ranks possibly empty). A replicated parameter (dim None) is rank
    0's piece. The result has the spec's full shape, else `CorruptStepError`."""
    shape = tuple(spec["shape"])
    if len(pieces) != spec["world_size"]:
        raise CorruptStepError(
            f"{name}: {len(pieces)} shards for a parameter cut over {spec['world_size']} ranks; "
            "a rank's shard is missing."
        )
    dim = spec["dim"]
    if dim is None:
        full = pieces[0]
    else:
        kept = [p for p in pieces if p.numel() > 0]
        rest = [tuple(p.shape[:dim]) + tuple(p.shape[dim + 1 :]) for p in kept]
        want = shape[:dim] + shape[dim + 1 :]
        if any(r != want for r in rest):
            raise CorruptStepError(
                f"{name}: a shard of shape {[tuple(p.shape) for p in kept]} does not fit the full "
                f"shape {list(shape)} cut along dim {dim}; the shards are from another run."
            )
        full = torch.cat(kept, dim=dim) if kept else pieces[0].new_empty(shape)
    if tuple(full.shape) != shape:
        raise CorruptStepError(
            f"{name}: its shards join to shape {list(full.shape)}, but the parameter has shape "
            f"{list(shape)}; a shard is missing or from another run."
        )
    return full
