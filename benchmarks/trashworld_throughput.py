"""TrashWorld's vectorised simulator: env steps per second (target: tens of thousands on 2 cores).

    python benchmarks/trashworld_throughput.py [--envs 64] [--steps 500]

Was a timed test; speed targets live in benchmarks (measure on a quiet machine: `uptime`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from chisel.envs import VecTrashWorld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    vec = VecTrashWorld(num_envs=args.envs, seed=0)
    vec.reset()
    actions = np.random.default_rng(0).integers(0, 7, (args.steps, args.envs))
    start = time.perf_counter()
    for a in actions:
        vec.step(a)
    rate = args.steps * args.envs / (time.perf_counter() - start)
    print(f"{rate:,.0f} env steps/s ({args.envs} rooms x {args.steps} steps)")


if __name__ == "__main__":
    main()
