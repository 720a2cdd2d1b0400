"""`import chisel` beyond `import torch`: seconds in fresh interpreters (target ≤ 0.3 s, issue 11).

    python benchmarks/import_time.py [--repeats 7]

Each repeat starts a new interpreter, imports torch, then times `import chisel` alone, so the
figure is what chisel adds. Prints each repeat and the median; run it on a quiet machine (`uptime`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = (
    "import time, torch\n"
    "t0 = time.perf_counter()\n"
    "import chisel\n"
    "print(time.perf_counter() - t0)\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    times = []
    for i in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
        print(f"repeat {i}: {times[-1] * 1e3:.1f} ms")
    median = statistics.median(times)
    print(f"import chisel beyond import torch: median {median * 1e3:.1f} ms "
          f"(target 300 ms: {'met' if median <= 0.3 else 'MISSED'})")


if __name__ == "__main__":
    main()
