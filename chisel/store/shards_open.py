"""Opening a distributed run on every rank, and what a rank ≥ 1 writes of a step (see
`chisel.store.shards` for the layout)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from chisel import _names as N
from chisel.capture.distributed import RankInfo, arrive, broadcast_json
from chisel.errors import (
    ChiselError,
    NotARunError,
    ResumeMismatchError,
    RunExistsError,
    WriterError,
)
from chisel.store.run_dir import OpenRun, open_run, sweep_temporary_files
from chisel.store.shards import shard_layout

_ERRORS: dict[str, type[ChiselError]] = {
    e.__name__: e for e in (RunExistsError, NotARunError, ResumeMismatchError, WriterError)
}


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
    arrive(info)
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
    sweep_temporary_files(layout.root)  # what a killed writer left half-written
    return OpenRun(layout, int(answer["first_step"]), {}, existed)


def open_sharded(
    run_dir: str | os.PathLike,
    info: RankInfo,
    *,
    overwrite: bool = False,
    resume: bool = False,
    check_resume: Callable[[dict[str, Any]], None] | None = None,
) -> OpenRun:
    """FSDP2: rank 0 opens the run's directory (its manifest will name the full parameters and
    how they are cut); then every rank, rank 0 included, opens its own sub-run `ranks/<r>/`, a
    complete run of its local shards. Collective, like `open_rank`."""
    del check_resume  # resume is refused before this (see the recorder)
    arrive(info)
    if info.writes_run:
        try:
            open_run(run_dir, overwrite=overwrite, resume=resume)
        except BaseException as err:
            kind = type(err).__name__ if type(err).__name__ in _ERRORS else "WriterError"
            broadcast_json(info, {"error": kind, "message": str(err)})
            raise
        broadcast_json(info, {"first_step": 0})
    else:
        answer = broadcast_json(info, None)
        if "error" in answer:
            raise _ERRORS[answer["error"]](f"rank 0 could not open the run: {answer['message']}")
    return open_run(shard_layout(run_dir, info.rank).root)
