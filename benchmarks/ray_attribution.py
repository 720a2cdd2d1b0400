"""Serial vs Ray attribution: wall time of the same ledger on a small recorded run.

Records a PPO-sized policy (the one of benchmarks/attribution.py: 11k params, minibatch 256,
Adam) for --steps updates, then attributes every update with all three families (credit summed by
reward) twice: `chisel.attribute` in this process, and `attribute_ray` over --tasks Ray tasks on a
local Ray instance of --cpus CPUs. Prints both times, Ray's start-up separately, the speed-up
with and without it, and checks that the two ledgers are equal row for row.

Ray sets OMP_NUM_THREADS=1 in its workers, so the serial run is timed at 1 and at 2 torch
threads: on a busy machine 2 threads can be much slower than 1 (they wait for each other).

Usage: python benchmarks/ray_attribution.py [--steps 40] [--cpus 2] [--tasks 2] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import chisel
import probes
from chisel.attribution.distributed import attribute_ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: `benchmarks` importable (the workers have it too)
from benchmarks.attribution import BATCH, record  # noqa: E402  (same policy, run)

OBS, HIDDEN, ACTIONS, METRIC_STATES = 102, 64, 7, 1024

_gen = torch.Generator().manual_seed(3)
_STATES = torch.rand(METRIC_STATES, OBS, generator=_gen)
METRIC = chisel.metrics.logprob(_STATES, torch.randint(0, ACTIONS, (METRIC_STATES,), generator=_gen))
METRIC_SPEC = "benchmarks.ray_attribution:METRIC"  # the workers import it


def features() -> probes.FeatureSet:
    gen = torch.Generator().manual_seed(2)
    feats = [probes.custom(f"obs{i}", "0:in", torch.randn(OBS, generator=gen)) for i in range(6)]
    feats += [probes.custom(f"h2_{i}", "3:out", torch.randn(HIDDEN, generator=gen)) for i in range(6)]
    return probes.FeatureSet(feats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads of the serial runs (Ray tasks use 1 each)")
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        policy = record(run_dir, args.steps)
        run = chisel.load(run_dir)
        options = dict(credit_by=["reward"], return_ledger=False)

        chisel.attribute(run, policy, features(), METRIC, steps=[0])  # warm-up (first-call costs)
        serial = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            chisel.attribute(run, policy, features(), METRIC, out=Path(tmp) / "serial.parquet", **options)
            serial[threads] = time.perf_counter() - start

        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        startup = time.perf_counter() - start
        try:
            times = []
            for i in range(2):  # the first call also starts the workers (imports torch, chisel)
                start = time.perf_counter()
                attribute_ray(run, policy, features(), METRIC_SPEC, tasks=args.tasks,
                              out=Path(tmp) / f"ray{i}", **options)
                times.append(time.perf_counter() - start)
        finally:
            ray.shutdown()
        a = chisel.load_ledger(Path(tmp) / "serial.parquet")
        b = chisel.load_ledger(Path(tmp) / "ray1")
        pd.testing.assert_frame_equal(a, b, check_exact=True)

    print(f"{args.steps} updates, {sum(p.numel() for p in policy.parameters()):,} params, "
          f"minibatch {BATCH}, all families (credit by reward), {len(a):,} ledger rows")
    for threads, seconds in serial.items():
        print(f"serial, {threads} torch thread(s):                 {seconds:7.1f} s")
    print(f"ray.init ({args.cpus} CPUs):                      {startup:7.1f} s")
    print(f"ray, {args.tasks} tasks, first call (workers start): {times[0]:7.1f} s")
    print(f"ray, {args.tasks} tasks, warm workers:              {times[1]:7.1f} s")
    best = min(serial.values())
    print(f"speed-up over the fastest serial, warm workers:   {best / times[1]:.2f}x")
    print(f"speed-up over the fastest serial, incl. start-up: {best / (startup + times[0]):.2f}x")
    print("ledgers equal row for row: yes")


if __name__ == "__main__":
    main()
