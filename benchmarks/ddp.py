"""DDP recording: agreement with a single-process run of the same global batch, and the cost.

Two gloo processes (CPU) train a float64 MLP (d_in 32 → 256 → 256 → 8, Adam, `--per-rank`
samples per rank) for `--steps` steps, once recorded (`chisel.record(ddp_model, …, factors=True)`
on every rank) and once not, from the same seed; one process then records the same global batch.
Prints:

- the largest relative difference, over steps and parameters, between the DDP run's `update(t)`
  and the single-process run's (‖Δ_ddp − Δ_single‖∞ / ‖Δ_single‖∞), and the same for the factors
  X and G after concatenating the ranks' shards, and for the tags;
- the largest relative residual of Σ_ranks Σ_i c · g_i x_iᵀ against the stored gradient;
- the ratio of rank 0's wall time per step with and without recording (two runs of each,
  interleaved, same machine: a ratio, not an absolute time; noisy on a shared machine), and the
  agreement check's share of a step (fingerprint + all-gather, timed alone).

Usage: python benchmarks/ddp.py [--steps 20] [--per-rank 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import chisel

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8)
    ).double()


def _batch(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 32, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    return x, y, torch.randn(n, generator=gen, dtype=torch.float64)


def _train(net, opt, rec, rows, steps: int, n: int) -> float:
    start = time.perf_counter()
    for step in range(steps):
        x, y, adv = (v[rows] for v in _batch(step, n))
        loss = (((net(x) - y) ** 2).sum(-1) * adv).mean()
        loss.backward()
        if rec is not None:
            rec.tag(advantage=adv)
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - start) / steps


def _rank(rank: int, world: int, init: str, root: str, steps: int, per_rank: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    rows, n = slice(rank * per_rank, (rank + 1) * per_rank), per_rank * world
    times = {}
    for mode in ("plain", "record", "plain2", "record2"):  # interleaved: drift hits both
        net = DDP(_model())
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        dist.barrier()
        if mode.startswith("record"):
            with chisel.record(net, opt, Path(root) / mode, factors=True, dtype="float64") as rec:
                times[mode] = _train(net, opt, rec, rows, steps, n)
        else:
            times[mode] = _train(net, opt, None, rows, steps, n)
    from chisel.capture.distributed import RankAgreement, rank_info

    info = rank_info()
    assert info is not None
    params = list(net.module.parameters())
    agree = RankAgreement(info, [n for n, _ in net.module.named_parameters()], params)
    start = time.perf_counter()
    for t in range(50):
        agree.check(t)
    times["agreement"] = (time.perf_counter() - start) / 50
    if rank == 0:
        (Path(root) / "times.json").write_text(json.dumps(times))
    dist.destroy_process_group()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-rank", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mp.spawn(_rank, args=(WORLD, f"file://{root / 'pg'}", str(root), args.steps, args.per_rank),
                 nprocs=WORLD)
        net = _model()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        with chisel.record(net, opt, root / "single", factors=True, dtype="float64") as rec:
            _train(net, opt, rec, slice(None), args.steps, args.per_rank * WORLD)
        ddp, single = chisel.load(root / "record"), chisel.load(root / "single")
        upd = fac = tag = rebuilt = 0.0
        for t in range(args.steps):
            a, b = ddp.update(t), single.update(t)
            upd = max(upd, *(_rel(a[k], b[k]) for k in b))
            fa, fb = ddp.factors(t), single.factors(t)
            fac = max(fac, *(_rel(fa[m][i], fb[m][i]) for m in fb for i in (0, 1)))
            tag = max(tag, _rel(ddp.tags(t)["advantage"], single.tags(t)["advantage"]))
            c, grads = ddp.record(t).grad_coef, ddp.grads(t)
            rebuilt = max(rebuilt, *(_rel(c * g.T @ x, grads[f"{m}.weight"]) for m, (x, g) in fa.items()))
        times = json.loads((root / "times.json").read_text())
    plain = (times["plain"] + times["plain2"]) / 2
    record = (times["record"] + times["record2"]) / 2
    print(f"{WORLD} gloo ranks × {args.per_rank} samples, {args.steps} Adam steps, float64")
    print(f"update vs single process: max relative difference {upd:.2e}")
    print(f"factors (X, G) vs single process: {fac:.2e}; tags: {tag:.2e}")
    print(f"Σ c·g_i x_iᵀ over both ranks vs stored gradient: {rebuilt:.2e}")
    print(f"rank 0 time per step, recorded / not recorded: {record / plain:.2f} "
          f"(runs: {times['record']:.4f}, {times['record2']:.4f} vs "
          f"{times['plain']:.4f}, {times['plain2']:.4f} s)")
    n = sum(p.numel() for p in _model().parameters())
    print(f"agreement check alone (fingerprint of {n:,} values + all-gather): "
          f"{times['agreement'] * 1e3:.2f} ms per step, {times['agreement'] / plain:.1%} of a step")


if __name__ == "__main__":
    main()
