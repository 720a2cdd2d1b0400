"""FSDP2 (`fully_shard`): what a rank holds of a sharded (DTensor) parameter.

FSDP2 cuts each parameter along dim 0 over a 1-D device mesh as `torch.chunk` does (trailing
ranks possibly empty); each rank holds its piece, the piece of the (reduce-scattered, mean)
gradient and of the optimizer state, and steps the optimizer on its pieces. chisel records each
rank's pieces (`local_tensor`, `local_grad`) and how the parameter is cut (`shard_spec`), and
the store joins them (`chisel.store.shards.reassemble`).
"""

from __future__ import annotations

from typing import Any

import torch


def is_sharded(param: torch.Tensor) -> bool:
    """True for a DTensor parameter (FSDP2's `fully_shard`, tensor parallelism)."""
    return type(param).__name__ == "DTensor" and hasattr(param, "placements")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (shares its storage: the optimizer's in-place updates show
    in it); any other tensor as it is."""
    if not is_sharded(tensor):
        return tensor
    with torch.no_grad():
        return tensor.to_local()


def local_grad(param: torch.Tensor) -> torch.Tensor | None:
    """This rank's piece of a parameter's gradient (FSDP2: the reduce-scattered mean)."""
    return None if param.grad is None else local_tensor(param.grad)


def shard_spec(param: torch.Tensor) -> dict[str, Any]:
    """How a DTensor parameter is cut over the ranks, as JSON: {"dim", "shape", "world_size"}.

    FSDP2 shards dim 0 (or the `shard_placement_fn` dim) over a 1-D mesh as `torch.chunk`
    does, trailing ranks possibly empty; `chisel.store.shards.reassemble` undoes it. Other
    layouts (2-D meshes: HSDP, tensor parallelism) are refused by name."""
    placements = tuple(param.placements)
    kinds = [type(p).__name__ for p in placements]
    if len(placements) != 1 or kinds[0] not in ("Shard", "Replicate"):
        raise ValueError(
            f"a DTensor parameter placed as {placements}: chisel reassembles parameters sharded "
            "over one mesh dimension (FSDP2's fully_shard over a 1-D mesh), not this layout."
        )
    dim = placements[0].dim if kinds[0] == "Shard" else None
    return {"dim": dim, "shape": list(param.shape), "world_size": int(param.device_mesh.size())}


def shard_rows(param: torch.Tensor) -> tuple[int, int]:
    """(first row, rows) of this rank's piece of a DTensor parameter cut along dim 0 (FSDP2:
    `torch.chunk` pieces of ⌈N/R⌉ rows, trailing ranks possibly empty)."""
    spec = shard_spec(param)
    n = spec["shape"][0] if spec["shape"] else 1
    if spec["dim"] is None:
        return 0, n
    if spec["dim"] != 0:
        raise ValueError(f"a parameter cut along dim {spec['dim']}: chisel's factors need dim 0")
    chunk = -(-n // spec["world_size"])
    start = min(param.device_mesh.get_local_rank() * chunk, n)
    return start, min(start + chunk, n) - start
