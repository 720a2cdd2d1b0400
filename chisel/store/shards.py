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
from pathlib import Path
from typing import Any

import torch

from chisel import _names as N
from chisel.errors import (
    CorruptStepError,
    ManifestError,
    MissingShardError,
    PartialFactorsError,
    TagError,
)
from chisel.store.layout import RunLayout, read_meta, read_tensors

DISTRIBUTED = "distributed"  # the manifest entry: {"world_size", "backend", "factor_scale"}


def shard_layout(root: str | os.PathLike, rank: int) -> RunLayout:
    """The folder rank `rank` (≥ 1) writes its shards to, laid out as a run's steps."""
    return RunLayout(Path(root) / N.RANKS_DIR / str(rank))


def world_size(manifest: dict[str, Any]) -> int:
    """Ranks that recorded the run (1 for a single-process run)."""
    entry = manifest.get(DISTRIBUTED) or {}
    size = entry.get("world_size", 1) if isinstance(entry, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ManifestError(
            f"{DISTRIBUTED}: {entry!r} has no world size (a positive int); the manifest was "
            "damaged or edited by hand: restore it from a copy of the run, or re-record."
        )
    return size


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


def concat_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several (X, G) of one module as one: stacked along samples, or as rows of tokens
    ([-1, features]) when their shapes beyond the first dim differ."""
    if len(pairs) == 1:
        return pairs[0]
    if len({(x.shape[1:], g.shape[1:]) for x, g in pairs}) == 1:
        return torch.cat([x for x, _ in pairs]), torch.cat([g for _, g in pairs])
    return (
        torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in pairs]),
        torch.cat([g.reshape(-1, g.shape[-1]) for _, g in pairs]),
    )


def merge_factors(
    parts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], t: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One step's factors over the ranks: each module's samples in rank order.

    A module that some ranks captured and others did not would give rows that no longer line up
    with the global batch's samples and tags: refused (PartialFactorsError), never concatenated."""
    modules = dict.fromkeys(m for part in parts for m in part)
    for m in modules:
        absent = [r for r, part in enumerate(parts) if m not in part]
        if absent:
            raise PartialFactorsError(
                f"Step {t}: factor module {m!r} ran on some ranks but not on rank(s) {absent}, so "
                "its per-sample rows cannot be matched to the global batch's samples and tags. "
                "Run the same modules on every rank (or record factors of modules every rank runs, "
                "`factors=[...]`); the step's update is unaffected."
            )
    return {m: concat_pairs([part[m] for part in parts]) for m in modules}


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


def shard_problems(root: Path, manifest: dict[str, Any], steps: range, require: bool) -> list[str]:
    """Every missing or damaged shard of `steps` in a distributed run (for `chisel verify`)."""
    try:
        ranks = range(1, world_size(manifest))
    except ManifestError as err:
        return [str(err)]
    out = []
    for r in ranks:
        for t in steps:
            path = shard_layout(root, r).step_file(t)
            if not path.is_file():
                out.append(f"{path}: missing; the factors and tags of rank {r}'s samples at step {t} "
                           "cannot be read")
                continue
            try:
                read_meta(path, t, f"rank {r} shard", verify=True)
                read_tensors(path, t, f"rank {r} shard", verify=True, require=require)
            except CorruptStepError as err:
                out.append(str(err))
    return out


def sharded_manifest(own: dict[str, Any], specs: dict[str, dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """The manifest of an FSDP2 run's directory, from rank 0's sub-run manifest `own`: the full
    shape of every parameter, and under `distributed.sharded` how each is cut (`shard_spec`)."""
    from chisel.capture.buffers import FlatLayout

    params = [{**p, "shape": list(specs[p["name"]]["shape"])} for p in own["params"]]
    layout = FlatLayout.build([p["name"] for p in params], [p["shape"] for p in params],
                              [p["dtype"] for p in params])
    return {**own, "params": params, "layout": layout.to_json(),
            DISTRIBUTED: {**info, "sharded": specs}}


def is_sharded_run(manifest: dict[str, Any]) -> bool:
    """An FSDP2 run: each rank's sub-run holds its shards (read with `ShardedRun`)."""
    entry = manifest.get(DISTRIBUTED)
    return isinstance(entry, dict) and isinstance(entry.get("sharded"), dict)


def global_samples(root: Path, t: int, ranks: int, own: int | None, *, verify: bool) -> int | None:
    """The samples of step t over all ranks (rank 0's `own` plus each shard's), None while a
    shard is missing."""
    total = own or 0
    for r in range(1, ranks):
        path = shard_layout(root, r).step_file(t)
        if not path.is_file():
            return None
        total += sum(read_meta(path, t, f"rank {r} shard", verify=verify).get("batch_sizes") or ())
    return total or None
