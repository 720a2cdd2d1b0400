"""What the online ledger costs: wall time of a training loop with and without it.

Modes, run ALTERNATING in one process (the order rotates every repeat, so drift of a shared
machine hits every mode alike), once with 1 and once with 2 torch threads (each thread setting in
its own subprocess):

    plain      no ledger
    online     chisel.online_ledger(...)                 geometry, first-order integrated, ghost credit
    nocredit   chisel.online_ledger(..., credit=False)   geometry and first-order integrated rows
    every16    chisel.online_ledger(..., every=16)       all rows, for every 16th step only

Workload: a policy MLP 128 → 512 → 512 → 8 (~333k params, float32), Adam, a policy-gradient loss
on a minibatch of B states; 8 features at the trunk's second site; the metric the mean
log-prob of taken actions on M states. Each step the ledger runs one forward+backward of the
metric (M states) on a private copy, so its cost is about M/B of a training step plus the
per-parameter work (θ snapshot, optimizer parts) and the rows.

Ratio: median(mode) / median(plain) over the repeats, of the training loop's time with the ledger
attached (steady state); entering (binding the features, copying the model) and closing (one
last metric evaluation, the final write) happen once per run and are reported apart, in seconds.
Target (issue 12): ≤ 1.05.

Usage:  python benchmarks/online_ledger.py [--quick] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import chisel
import probes

MODES = ("plain", "online", "nocredit", "every16")
EVERY = 16
WORKLOADS = {  # name -> (minibatch B, metric states M)
    "B256-M64": (256, 64),
    "B1024-M64": (1024, 64),
    "B1024-M16": (1024, 16),
}


def _setup(batch: int, states: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(1)
    feats = probes.FeatureSet([
        probes.Feature(name=f"f{j}", site="1:out", read=torch.randn(512, generator=gen)) for j in range(8)
    ])
    metric = chisel.metrics.logprob(torch.randn(states, 128, generator=gen), torch.randint(0, 8, (states,), generator=gen))
    data = [(torch.randn(batch, 128, generator=gen), torch.randint(0, 8, (batch,), generator=gen),
             torch.randn(batch, generator=gen)) for _ in range(8)]
    return model, opt, feats, metric, data


def _segment(mode: str, steps: int, setup, out: Path) -> tuple[float, float]:
    """(seconds of the training loop, seconds of entering and closing the ledger). The loop is
    timed inside the `with` block: a training run enters the ledger once, not once per segment."""
    model, opt, feats, metric, data = setup

    def loop() -> float:
        start = time.perf_counter()
        for i in range(steps):
            obs, act, adv = data[i % len(data)]
            logp = torch.log_softmax(model(obs), -1)[torch.arange(len(obs)), act]
            (-(logp * adv).mean()).backward()
            opt.step()
            opt.zero_grad()
        return time.perf_counter() - start

    if mode == "plain":
        return loop(), 0.0
    start = time.perf_counter()
    with chisel.online_ledger(model, opt, feats, metric, out / f"{mode}.parquet",
                              credit=mode != "nocredit", every=EVERY if mode == "every16" else 1):
        looped = loop()
    return looped, time.perf_counter() - start - looped


def _child(threads: int, steps: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (batch, states) in WORKLOADS.items():
            setup = _setup(batch, states)
            times: dict[str, list[float]] = {m: [] for m in MODES}
            fixed: dict[str, list[float]] = {m: [] for m in MODES}
            _segment("plain", 5, setup, Path(tmp))  # warm-up
            _segment("online", 5, setup, Path(tmp))
            for r in range(repeats):
                order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
                for mode in order:
                    looped, once = _segment(mode, steps, setup, Path(tmp))
                    times[mode].append(looped)
                    fixed[mode].append(once)
            base = statistics.median(times["plain"])
            result[name] = {
                "plain_ms_per_step": 1e3 * base / steps,
                **{f"{m}_ratio": statistics.median(times[m]) / base for m in MODES[1:]},
                **{f"{m}_enter_close_s": statistics.median(fixed[m]) for m in MODES[1:]},
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "online_ledger.json"))
    args = parser.parse_args()
    steps, repeats = (16, 3) if args.quick else (32, 5)  # a multiple of EVERY
    if args.child:
        print(json.dumps(_child(args.child, steps, repeats)))
        return
    results = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(threads)] + (["--quick"] if args.quick else [])
        text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[f"threads={threads}"] = json.loads(text.strip().splitlines()[-1])
        for name, r in results[f"threads={threads}"].items():
            print(f"threads={threads} {name:10s} plain {r['plain_ms_per_step']:7.2f} ms/step  "
                  f"online {r['online_ratio']:.3f}x  nocredit {r['nocredit_ratio']:.3f}x  "
                  f"every{EVERY} {r['every16_ratio']:.3f}x  (target 1.05x; "
                  f"enter+close once: {r['online_enter_close_s']:.2f} s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": steps, "repeats": repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
