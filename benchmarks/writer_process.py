"""The writer-process lever of issue 11, measured on a prototype: does moving the writer's work out of
the training process remove recording's remaining wall-time cost?

chisel's writer is a thread: its numpy and zlib work releases the GIL, but its Python does not, and
with 2 cores it also competes with torch's intra-op threads. This prototype does the writer's work
(the update θ_{t+1} − θ_t, float64 per-parameter norms, a CRC32 and an O_DIRECT-less file write +
rename per step) on the benchmarks/overhead.py workloads, in three modes alternated in one process:

    plain     training only
    thread    after each step θ is copied into one of 4 slots (the copy chisel's hook makes), and a
              writer THREAD does the work on it
    process   the same copy into slots in shared memory, and a writer PROCESS (spawned) does it

Both writers get the same back-pressure (4 slots). The training thread's work is identical in the
two modes, so their difference is what a writer process would save. Prints median wall ratios over
plain, and the training process's CPU per step (the process mode's child CPU apart).

Usage:  python benchmarks/writer_process.py [--threads 1,2] [--workloads small,mlp,large] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import WORKLOADS, Trainer, _cpu  # the same workloads as the overhead benchmark

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover
    from zlib import crc32

SLOTS = 4


def work(theta: np.ndarray, prev: np.ndarray, bounds: list[tuple[int, int]], path: str) -> float:
    """The writer's work on one step: update, per-parameter float64 norms, CRC32, write + rename."""
    diff = theta - prev  # float32 [n]
    norms = []
    for a, b in bounds:  # einsum, not np.dot: BLAS would start its own threads
        d = diff[a:b].astype(np.float64)
        norms.append(float(np.einsum("i,i->", d, d)))
    prev[:] = theta
    data = memoryview(theta).cast("B")
    crc = crc32(data)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return sum(norms) + crc * 0.0


def _child(shm_name: str, n: int, bounds, todo, done, folder: str) -> None:
    """The writer process: slots in shared memory, slot numbers over a queue."""
    shm = shared_memory.SharedMemory(name=shm_name)
    slots = np.ndarray((SLOTS, n), dtype=np.float32, buffer=shm.buf)
    prev = slots[0].copy()
    start = _cpu()
    done.put("ready")  # start-up (imports) is not part of the timed segment
    while (item := todo.get()) is not None:
        step, slot = item
        work(slots[slot], prev, bounds, os.path.join(folder, f"{step % 64}.bin"))
        done.put(slot)
    del slots
    shm.close()
    done.put(_cpu() - start)


class Writer:
    """Slots for θ copies and a writer (thread or process) that does `work` on each."""

    def __init__(self, kind: str, params: list[torch.Tensor], folder: str) -> None:
        self.kind, self.params = kind, params
        sizes = [p.numel() for p in params]
        self.n = sum(sizes)
        edges = np.cumsum([0, *sizes])
        self.bounds = [(int(a), int(b)) for a, b in itertools.pairwise(edges)]
        self.folder, self.step = folder, 0
        if kind == "process":
            self.shm = shared_memory.SharedMemory(create=True, size=SLOTS * self.n * 4)
            self.slots = np.ndarray((SLOTS, self.n), dtype=np.float32, buffer=self.shm.buf)
        else:
            self.slots = np.zeros((SLOTS, self.n), dtype=np.float32)
        self.views = [torch.from_numpy(self.slots[k]) for k in range(SLOTS)]
        self._copy(self.views[0])  # θ_0: the writer's first θ_prev
        self.free = list(range(SLOTS))
        if kind == "process":
            ctx = mp.get_context("spawn")
            self.todo, self.done = ctx.Queue(), ctx.Queue()
            self.proc = ctx.Process(target=_child, args=(self.shm.name, self.n, self.bounds, self.todo,
                                                         self.done, folder), daemon=True)
            self.proc.start()
            if self.done.get(timeout=120) != "ready":
                raise RuntimeError("the writer process did not start")
        else:
            self.todo, self.done = queue.Queue(), queue.Queue()
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        prev = self.slots[0].copy()
        while (item := self.todo.get()) is not None:
            step, slot = item
            work(self.slots[slot], prev, self.bounds, os.path.join(self.folder, f"{step % 64}.bin"))
            self.done.put(slot)

    def _copy(self, out: torch.Tensor) -> None:
        torch.cat([p.detach().reshape(-1) for p in self.params], out=out)

    def after_step(self) -> None:
        if not self.free:
            self.free.append(self.done.get())  # back-pressure
        while True:
            try:
                self.free.append(self.done.get_nowait())
            except queue.Empty:
                break
        slot = self.free.pop()
        self._copy(self.views[slot])
        self.todo.put((self.step, slot))
        self.step += 1

    def drain(self) -> float:
        """Wait until every step is written; the child's CPU seconds (process mode), else 0."""
        self.todo.put(None)
        if self.kind == "process":
            cpu = None
            while cpu is None or isinstance(cpu, int):
                cpu = self.done.get()
            return float(cpu)
        self.thread.join()
        return 0.0

    def close(self) -> None:
        """End the writer (a process's interpreter shutdown is not part of the timed work)."""
        if self.kind == "process":
            self.proc.join()
            del self.views, self.slots
            self.shm.close()
            self.shm.unlink()


def segment(trainer: Trainer, mode: str, steps: int, folder: str) -> tuple[float, float, float]:
    """(wall seconds incl. the writer's drain, this process's CPU seconds, the child's CPU)."""
    c0 = time.process_time()
    if mode == "plain":
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.step(None)
        return time.perf_counter() - t0, time.process_time() - c0, 0.0
    writer = Writer(mode, list(trainer.policy.parameters()), folder)  # start-up not timed
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(None)
        writer.after_step()
    child = writer.drain()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    writer.close()
    return wall, cpu, child


def child_main(threads: int, names: list[str], quick: bool) -> dict:
    torch.set_num_threads(threads)
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            w = WORKLOADS[name]
            trainer = Trainer(w)
            steps, repeats = (60, 3) if quick else (w.steps, w.repeats)
            modes = ("plain", "thread", "process")
            wall = {m: [] for m in modes}
            cpu = {m: [] for m in modes}
            child = []
            segment(trainer, "plain", 10, folder)
            for r in range(repeats):
                for mode in modes[r % 3:] + modes[: r % 3]:
                    t, c, k = segment(trainer, mode, steps, folder)
                    wall[mode].append(t)
                    cpu[mode].append(c / steps)
                    if mode == "process":
                        child.append(k / steps)
            base = statistics.median(wall["plain"])
            out[name] = {
                "plain_ms": 1e3 * base / steps,
                "thread_ratio": statistics.median(wall["thread"]) / base,
                "process_ratio": statistics.median(wall["process"]) / base,
                "cpu_ms": {m: 1e3 * statistics.median(cpu[m]) for m in modes},
                "child_cpu_ms": 1e3 * statistics.median(child),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--workloads", default="small,mlp,large")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.workloads.split(",")
    if args.child:
        print(json.dumps(child_main(args.child, names, args.quick)))
        return
    print(f"load average at start: {os.getloadavg()}")
    for threads in [int(t) for t in args.threads.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(threads), "--workloads", args.workloads]
        text = subprocess.run(cmd + (["--quick"] if args.quick else []), check=True,
                              capture_output=True, text=True).stdout
        for name, r in json.loads(text.strip().splitlines()[-1]).items():
            cpu = r["cpu_ms"]
            print(f"threads={threads} {name:5s} plain {r['plain_ms']:6.2f} ms/step | writer thread "
                  f"{r['thread_ratio']:.2f}x | writer process {r['process_ratio']:.2f}x | training process "
                  f"CPU/step: plain {cpu['plain']:.2f}, thread {cpu['thread']:.2f}, process "
                  f"{cpu['process']:.2f} ms (+ child {r['child_cpu_ms']:.2f} ms)")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
