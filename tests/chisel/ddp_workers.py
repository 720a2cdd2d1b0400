"""The training loops that `test_ddp.py` runs in 2 gloo processes (and once in one process).

Importable by name in the spawned children (the test puts this folder on sys.path), so that
`torch.multiprocessing.spawn` can find `run_ranks`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import chisel
from chisel.capture import distributed
from chisel.errors import RankMismatchError, RecordConfigError, RunExistsError

PER_RANK = 3  # samples per rank; the global batch is PER_RANK × world size
STEPS = 3
D_IN, WIDTH, D_OUT = 4, 8, 3


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, D_OUT)).double()


def optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    return torch.optim.Adam(params, lr=0.05)


def global_batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, D_IN], y [N, D_OUT], advantage [N] of step `step`; rank r's samples are rows
    r·PER_RANK … (r+1)·PER_RANK − 1."""
    gen = torch.Generator().manual_seed(100 + step)
    n = PER_RANK * world
    x = torch.randn(n, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(n, D_OUT, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y, adv


def train(net: nn.Module, opt, rec, rows: slice, world: int, *, clip: float | None, rank: int,
          steps: int = STEPS) -> None:
    """`steps` steps on the samples `rows` of each global batch; loss = mean over those rows."""
    for step in range(steps):
        x, y, adv = global_batch(step, world)
        x, y, adv = x[rows], y[rows], adv[rows]
        loss = (((net(x) - y) ** 2).sum(-1) * adv).mean()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        rec.tag(advantage=adv, epoch=1, rank=rank)
        opt.step()
        opt.zero_grad()


def record_single(root: Path, kind: str, world: int, clip: float | None) -> Path:
    """The reference: one process, the whole global batch per step."""
    net = model()
    opt = optimizer(kind, net.parameters())
    run_dir = root / f"single-{kind}"
    with chisel.record(net, opt, run_dir, factors=True, dtype="float64") as rec:
        train(net, opt, _RankTags(rec, world), slice(None), world, clip=clip, rank=0)
    return run_dir


def run_ranks(rank: int, world: int, init: str, root: str) -> None:
    """Every scenario of the test, on one rank (`torch.multiprocessing.spawn` target)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    out = Path(root)
    result: dict[str, str] = {}
    try:
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for kind, clip in (("sgd", None), ("adam", 0.05)):
            net = DDP(model())
            opt = optimizer(kind, net.parameters())
            with chisel.record(net, opt, out / f"ddp-{kind}", factors=True, dtype="float64") as rec:
                train(net, opt, rec, rows, world, clip=clip, rank=rank)
        # the run exists: rank 0 refuses, and every rank raises (none waits for it forever)
        try:
            net = DDP(model())
            chisel.record(net, torch.optim.SGD(net.parameters(), lr=0.1), out / "ddp-sgd")
        except RunExistsError as err:
            result["exists"] = str(err)
        # not wrapped in DDP: each rank steps on its own gradient, θ diverges after step 0
        net = model()
        opt = optimizer("sgd", net.parameters())
        try:
            with chisel.record(net, opt, out / "diverged", factors=True, dtype="float64") as rec:
                train(net, opt, rec, rows, world, clip=None, rank=rank)
        except RankMismatchError as err:
            result["mismatch"] = str(err)
        # unequal batches (rank 0: 2 samples, rank 1: 4): DDP's gradient is the mean of the ranks'
        # means, which the 1/R-scaled factors still rebuild; a per-rank scalar tag is spread over
        # each rank's own samples
        net = DDP(model())
        opt = optimizer("sgd", net.parameters())
        uneven = slice(0, 2) if rank == 0 else slice(2, 6)
        with chisel.record(net, opt, out / "uneven", factors=True, dtype="float64") as rec:
            train(net, opt, rec, uneven, world, clip=None, rank=rank, steps=1)
        # resume: rank 0 continues the step numbering, every rank its shards
        for resume in (False, True):
            net = DDP(model())
            opt = optimizer("sgd", net.parameters())
            with chisel.record(net, opt, out / "resumed", factors=True, dtype="float64",
                               resume=resume) as rec:
                train(net, opt, rec, rows, world, clip=None, rank=rank, steps=1)
        # distributed=False: each rank trains and records alone, into its own run (no collectives)
        net = model()
        opt = optimizer("sgd", net.parameters())
        with chisel.record(net, opt, out / f"alone-{rank}", factors=True, dtype="float64",
                           distributed=False) as rec:
            train(net, opt, rec, rows, world, clip=None, rank=rank, steps=1)
        # recorded on rank 0 only: rank 0 names the ranks that never came (last: rank 1 skips it)
        distributed.ARRIVAL_TIMEOUT_S = 2.0
        if rank == 0:
            net = model()
            try:
                chisel.record(net, torch.optim.SGD(net.parameters(), lr=0.1), out / "rank0-only")
            except RecordConfigError as err:
                result["alone"] = str(err)
    finally:
        (out / f"result-{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def train_plain(kind: str, world: int, run_dir: Path) -> list[dict[str, torch.Tensor]]:
    """θ before training and after it, one process on the global batch, recorded to `run_dir`."""
    net = model()
    opt = optimizer(kind, net.parameters())
    thetas = [{n: p.detach().clone() for n, p in net.named_parameters()}]
    with chisel.record(net, opt, run_dir, factors=True, dtype="float64") as rec:
        train(net, opt, _RankTags(rec, world), slice(None), world, clip=None, rank=0)
    thetas.append({n: p.detach().clone() for n, p in net.named_parameters()})
    return thetas


class _RankTags:
    """One process's stand-in for the ranks' tags: rank r for the samples rank r would hold."""

    def __init__(self, rec, world: int) -> None:
        self.rec, self.world = rec, world

    def tag(self, **values) -> None:
        values["rank"] = torch.arange(self.world).repeat_interleave(PER_RANK)
        self.rec.tag(**values)


class _NoTags:
    def tag(self, **values) -> None:
        pass


def fsdp_ranks(rank: int, world: int, init: str, root: str) -> None:
    """FSDP2 (`fully_shard`) on gloo: each rank saves its local shards of θ before and after
    training, with their shard specs, and rank 0 the full θ (`full_tensor()`) to compare."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from chisel.capture.distributed_fsdp import shard_spec

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    out = Path(root)
    try:
        net = model()
        mesh = init_device_mesh("cpu", (world,))
        for layer in (net[0], net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        opt = optimizer("adam", net.parameters())
        try:  # not supported under FSDP2 yet: refused by name, nothing written
            chisel.record(net, opt, out / "refused", resume=True)
        except RecordConfigError as err:
            (out / f"refused-{rank}.txt").write_text(str(err))

        def save(tag: str) -> None:
            local = {n: p.to_local().detach().clone().contiguous() for n, p in net.named_parameters()}
            save_file(local, str(out / f"{tag}-rank{rank}.safetensors"))
            full = {n: p.full_tensor().detach().clone() for n, p in net.named_parameters()}
            if rank == 0:
                save_file(full, str(out / f"{tag}-full.safetensors"))
                specs = {n: shard_spec(p) for n, p in net.named_parameters()}
                (out / "specs.json").write_text(json.dumps(specs))

        save("before")
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        with chisel.record(net, opt, out / "fsdp-run", factors=True, dtype="float64") as rec:
            train(net, opt, rec, rows, world, clip=None, rank=rank)
        save("after")
    finally:
        dist.destroy_process_group()
