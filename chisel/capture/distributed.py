"""Recording inside a `torch.distributed` job: which rank this is, the model under a DDP
wrapper, and the check that every rank holds the same θ after each step.

Under DistributedDataParallel every rank computes its gradient on its own samples, the
all-reduce averages them (`grad = (1/R) Σ_r grad_r`), and every rank then takes the same
optimizer step: θ after the step must agree bit for bit on all ranks. So one rank (rank 0)
records the update; every rank records the per-sample factors and tags of its own samples,
scaled by 1/R so that the factors of all ranks together sum to the stored gradient (see
`factor_scale`). `RankAgreement` verifies the bit-for-bit claim at every step with one small
all-gather, and raises `RankMismatchError` naming the ranks and parameters that differ.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from chisel.errors import RankMismatchError, RecordConfigError

# how long rank 0 waits (gloo) for every rank to enter chisel.record before it names the missing
ARRIVAL_TIMEOUT_S = 300.0
_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a process group of more than one rank."""

    rank: int
    world_size: int
    backend: str

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")

    @property
    def writes_run(self) -> bool:
        """Rank 0 writes the update, θ keyframes and the manifest; every rank its shard."""
        return self.rank == 0

    @property
    def factor_scale(self) -> float:
        """The factor g_i is multiplied by: DDP averages the ranks' gradients, so sample i of
        rank r contributes (1/R) g_i x_iᵀ to the gradient the optimizer consumes."""
        return 1.0 / self.world_size

    def to_json(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend,
                "factor_scale": self.factor_scale}


def rank_info() -> RankInfo | None:
    """The rank of this process, or None outside an initialized group of more than one rank."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    if world <= 1:
        return None
    return RankInfo(dist.get_rank(), world, str(dist.get_backend()))


def unwrap_model(model: Any) -> Any:
    """The module inside a `DistributedDataParallel` (or `DataParallel`) wrapper, so the run
    names parameters as the plain model does (`0.weight`, not `module.0.weight`) and can be
    attributed with the plain model. Anything else is returned as it is."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def fingerprint(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """One int64 per parameter: the sum (wrapping) of its values' bit patterns. [n_params]

    Any single differing bit changes it; computed on the parameters' device without a copy of
    θ. Equal fingerprints are what `RankAgreement` compares across ranks."""
    out = []
    for p in params:
        flat = p.detach().reshape(-1)
        if flat.is_floating_point() or flat.is_complex():
            flat = flat.view(_INT_OF_SIZE[flat.element_size()])
        out.append(flat.sum(dtype=torch.int64))
    return torch.stack(out)


def _collective_device(backend: str, like: torch.Tensor) -> torch.device:
    return like.device if "nccl" in backend else torch.device("cpu")


class RankAgreement:
    """After each optimizer step, all-gathers every rank's `fingerprint` of θ and raises
    `RankMismatchError` on every rank if any differs from rank 0's (one collective per step:
    all ranks call it in the same order, so none is left waiting)."""

    def __init__(self, info: RankInfo, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
        self.info, self.names, self.params = info, list(names), list(params)

    def check(self, step: int) -> None:
        import torch.distributed as dist

        local = fingerprint(self.params)
        local = local.to(_collective_device(self.info.backend, local))
        gathered = [torch.empty_like(local) for _ in range(self.info.world_size)]
        dist.all_gather(gathered, local)
        problem = disagreement(step, [g.cpu() for g in gathered], self.names)
        if problem is not None:
            raise RankMismatchError(problem)


def disagreement(step: int, fingerprints: Sequence[torch.Tensor], names: Sequence[str]) -> str | None:
    """The message naming the ranks (and parameters) whose θ differs from rank 0's, or None.

    fingerprints: one [n_params] int64 tensor per rank, in rank order."""
    ref = fingerprints[0]
    ranks = [r for r, f in enumerate(fingerprints) if not torch.equal(f, ref)]
    if not ranks:
        return None
    params = sorted({names[i] for r in ranks for i in (fingerprints[r] != ref).nonzero().flatten().tolist()})
    return (
        f"step {step}: after optimizer.step() the parameters of rank(s) {ranks} differ from rank "
        f"0's ({', '.join(params[:6])}{', …' if len(params) > 6 else ''}), so the ranks no longer "
        "train one model and the run cannot record one update. Likely causes: the model is not "
        "wrapped in DistributedDataParallel (gradients never all-reduced), ranks started from "
        "different weights (seed, or a checkpoint loaded on one rank only), or a parameter updated "
        "outside the optimizer on some ranks. Wrap the model in DDP after loading the same "
        "weights on every rank."
    )


def arrive(info: RankInfo) -> None:
    """Wait until every rank has entered `chisel.record` (gloo: at most `ARRIVAL_TIMEOUT_S`,
    then `RecordConfigError` naming the ranks that did not). Under NCCL, which has no monitored
    barrier, a rank that never calls it leaves the others waiting, as a missing DDP rank does."""
    import torch.distributed as dist

    if "gloo" not in info.backend:
        return
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=ARRIVAL_TIMEOUT_S), wait_all_ranks=True)
    except RuntimeError as err:
        raise RecordConfigError(
            f"rank {info.rank}: not every rank of the {info.world_size}-rank job entered "
            f"chisel.record within {ARRIVAL_TIMEOUT_S:g} s ({str(err).strip().splitlines()[0]}). "
            "In a distributed job every rank calls chisel.record with the same run_dir: rank 0 "
            "records the update, every rank the factors and tags of its own samples. Call it on "
            "every rank, not under `if rank == 0`."
        ) from err


def _device(info: RankInfo) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in info.backend else torch.device("cpu")


def broadcast_json(info: RankInfo, value: Any) -> Any:
    """Rank 0's JSON-able `value` on every rank (as bytes: no pickle)."""
    return json.loads(broadcast_from(info, 0, json.dumps(value) if info.rank == 0 else None))


def broadcast_from(info: RankInfo, src: int, text: str | None) -> str:
    """A string held by rank `src`, on every rank."""
    import torch.distributed as dist

    device = _device(info)
    data = (text or "").encode() if info.rank == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if info.rank == src and data:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=src)
    return bytes(buf.cpu().tolist()).decode()


def sum_over_ranks(info: RankInfo):
    """A function summing a float64 CPU vector over all ranks (every rank calls it in step)."""
    import torch.distributed as dist

    def reduce(flat: torch.Tensor) -> torch.Tensor:
        work = flat.to(_device(info))
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.cpu()

    return reduce
