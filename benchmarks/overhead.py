"""What recording costs: wall time, process CPU and memory of a PPO-shaped minibatch loop.

Three workloads, each run in four modes ALTERNATING in one process (the order rotates every
repeat, so drift of a shared machine hits every mode alike), once with 1 and once with 2 torch
threads (each thread setting in its own subprocess):

    plain     no recording
    deltas    chisel.record(...)                  (default: exact θ after every step + the consumed grads)
    nograds   chisel.record(..., grads=False)     (exact θ after every step only)
    factors   chisel.record(..., factors=True)    (the above + per-sample (x_i, g_i) of every Linear)

Workloads (CleanRL-style PPO update: clipped surrogate + value loss + entropy, per-minibatch
advantage normalisation, Adam(eps=1e-5), clip_grad_norm_(0.5), advantages tagged on the step):

    small   actor and critic MLPs 64 → 128 → 128 → {8 actions, 1 value}  (~51k params), minibatch 256
    mlp     shared trunk 128 → 512 → 512 → {8 actions, 1 value}         (~333k params), minibatch 256
    large   shared trunk 512 → 2048 → 2048 → {16 actions, 1 value}      (~5.3M params), minibatch 64

Time: wall time of N ≥ 150 optimizer steps per segment (back-pressure of the writer included),
and of the same plus `close()`; the ratio is median(mode) / median(plain). CPU: the process's
CPU time (all threads: training and chisel's writer) per step; "extra CPU" is recording's
added CPU per step as a share of the plain step's CPU (target ≤ 10%).

Memory: each (workload, mode) runs again in a fresh subprocess; "extra" is its peak RSS
(VmHWM of /proc/self/status) minus the peak RSS of the plain subprocess, printed as a multiple
of the parameter bytes and compared with the bound stated in docs/recording.md.

Usage:  python benchmarks/overhead.py [--quick] [--profile] [--no-memory] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributions import Categorical

import chisel

MODES = ("plain", "deltas", "nograds", "factors")
RECORDED = MODES[1:]
QUEUE_SIZE = 4  # chisel.record's default, stated here so the memory bound uses the same number
TARGETS = {  # torch threads -> mode -> ratio target (issue 11, on a 2-core machine)
    1: {"deltas": 1.05, "nograds": 1.05, "factors": 1.15},
    2: {"deltas": 1.15, "nograds": 1.15, "factors": 1.30},
}
CPU_TARGET = 0.10  # recording's extra process CPU per step, as a share of the plain step's


class ActorCritic(nn.Module):
    """CleanRL's PPO agent: separate actor and critic MLPs, or a shared trunk with two heads."""

    def __init__(self, obs: int, hidden: int, actions: int, *, shared: bool) -> None:
        super().__init__()

        def trunk() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(obs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
            )

        self.shared = shared
        self.trunk = trunk() if shared else None
        self.actor = nn.Sequential(*([] if shared else [trunk()]), nn.Linear(hidden, actions))
        self.critic = nn.Sequential(*([] if shared else [trunk()]), nn.Linear(hidden, 1))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # obs [batch, obs] -> logits [batch, actions], value [batch]
        h = self.trunk(obs) if self.trunk is not None else obs
        return self.actor(h), self.critic(h).squeeze(-1)


@dataclass(frozen=True)
class Workload:
    name: str
    obs: int
    hidden: int
    actions: int
    shared: bool
    minibatch: int
    rollout: int  # samples in the rollout buffer the minibatches are drawn from
    steps: int  # optimizer steps per timed segment
    repeats: int


WORKLOADS = {
    "small": Workload("small", 64, 128, 8, False, 256, 2048, 150, 5),
    "mlp": Workload("mlp", 128, 512, 8, True, 256, 2048, 150, 3),
    "large": Workload("large", 512, 2048, 16, True, 64, 1024, 150, 3),
}


class Trainer:
    """A policy, its optimizer and a fixed rollout buffer; `run(n, rec)` does n minibatch steps."""

    def __init__(self, w: Workload) -> None:
        torch.manual_seed(0)
        self.w = w
        self.policy = ActorCritic(w.obs, w.hidden, w.actions, shared=w.shared)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=2.5e-4, eps=1e-5)
        gen = torch.Generator().manual_seed(1)
        n = w.rollout
        self.obs = torch.randn(n, w.obs, generator=gen)  # [rollout, obs]
        self.act = torch.randint(0, w.actions, (n,), generator=gen)
        self.logp_old = torch.full((n,), -float(torch.log(torch.tensor(float(w.actions)))))
        self.adv = torch.randn(n, generator=gen)
        self.ret = torch.randn(n, generator=gen)
        self._order = torch.randperm(n, generator=gen)
        self._pos = 0

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.policy.parameters())

    def _minibatch(self) -> torch.Tensor:
        if self._pos + self.w.minibatch > self.w.rollout:
            self._order = torch.randperm(self.w.rollout)
            self._pos = 0
        idx = self._order[self._pos : self._pos + self.w.minibatch]
        self._pos += self.w.minibatch
        return idx

    def step(self, rec: chisel.Recorder | None) -> None:
        idx = self._minibatch()
        logits, value = self.policy(self.obs[idx])
        dist = Categorical(logits=logits)
        logp = dist.log_prob(self.act[idx])
        ratio = (logp - self.logp_old[idx]).exp()
        adv = self.adv[idx]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
        v_loss = 0.5 * ((value - self.ret[idx]) ** 2).mean()
        loss = pg + 0.5 * v_loss - 0.01 * dist.entropy().mean()
        self.opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.policy.parameters(), 0.5)
        if rec is not None:
            rec.tag(advantage=adv)
        self.opt.step()

    def segment(self, mode: str, run_dir: Path, n: int) -> tuple[float, ...]:
        """n steps in `mode`; returns (seconds of the steps, seconds of the steps + close,
        process CPU seconds of the steps + close, CPU seconds of the training thread, of
        chisel's writer thread and of its file thread; the last two 0 for plain)."""
        c0, m0 = _cpu(), time.thread_time()
        if mode == "plain":
            t0 = time.perf_counter()
            for _ in range(n):
                self.step(None)
            t1 = time.perf_counter()
            return t1 - t0, t1 - t0, _cpu() - c0, time.thread_time() - m0, 0.0, 0.0
        rec = chisel.record(
            self.policy, self.opt, run_dir, factors=mode == "factors", grads=mode != "nograds",
            queue_size=QUEUE_SIZE,
        )
        writer = rec._writer  # chisel's threads, read before close() ends them
        files = getattr(writer, "_io", None)  # the file thread (chisel ≥ this benchmark)
        threads = [writer._thread.native_id, files._thread.native_id if files else None]
        t0 = time.perf_counter()
        try:
            for _ in range(n):
                self.step(rec)
            t1 = time.perf_counter()
            rec.flush()
            busy = [_thread_cpu(tid) for tid in threads]
        finally:
            rec.close()
        return (t1 - t0, time.perf_counter() - t0, _cpu() - c0, time.thread_time() - m0, *busy)


def _cpu() -> float:
    """CPU seconds of this process: every thread, user and system (page-cache writes count)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _thread_cpu(tid: int | None) -> float:
    """CPU seconds of one thread of this process (Linux: /proc; 0 where unavailable)."""
    try:
        return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _bytes_per_step(run_dir: Path) -> float:
    run = chisel.load(run_dir)
    files = [run.layout.step_file(t) for t in range(len(run))]
    return sum(f.stat().st_size for f in files if f.exists()) / max(len(run), 1)


def time_workload(w: Workload, root: Path, quick: bool) -> dict:
    """Alternate the modes over the repeats; median seconds and CPU per mode, bytes per step."""
    trainer = Trainer(w)
    repeats = 2 if quick else w.repeats
    steps = 30 if quick else w.steps
    loop: dict[str, list[float]] = {m: [] for m in MODES}
    total: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    threads: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
    per_step: dict[str, float] = {}
    for r in range(-1, repeats):  # r = -1 warms up every mode (short) and is not counted
        k = r % len(MODES)
        order = MODES[k:] + MODES[:k]
        for mode in order:
            run_dir = root / f"{w.name}-{mode}-{r + 1}"
            seconds = trainer.segment(mode, run_dir, steps if r >= 0 else 10)
            if mode != "plain":
                per_step[mode] = _bytes_per_step(run_dir)
                shutil.rmtree(run_dir)
            if r >= 0:
                loop[mode].append(seconds[0])
                total[mode].append(seconds[1])
                cpu[mode].append(seconds[2])
                threads[mode].append(seconds[3:])
    return {
        "params": sum(p.numel() for p in trainer.policy.parameters()),
        "param_bytes": trainer.param_bytes,
        "steps": steps,
        "loop": {m: statistics.median(v) for m, v in loop.items()},
        "total": {m: statistics.median(v) for m, v in total.items()},
        "cpu": {m: statistics.median(v) for m, v in cpu.items()},
        # training, writer and file thread CPU seconds per segment (medians, each on its own)
        "threads": {m: [statistics.median(x[i] for x in v) for i in range(3)] for m, v in threads.items()},
        "spread": {m: (min(v), max(v)) for m, v in loop.items()},
        "bytes_per_step": per_step,
        "repeats": repeats,
    }


def memory_child(workload: str, mode: str, quick: bool) -> None:
    """Run one mode in this (fresh) process and print its peak RSS in bytes as JSON."""
    w = WORKLOADS[workload]
    trainer = Trainer(w)
    n = max(30 if quick else w.steps, 2 * QUEUE_SIZE + 4)  # long enough to fill pool and queue
    with tempfile.TemporaryDirectory() as tmp:
        trainer.segment("plain", Path(tmp) / "warm", 2)
        trainer.segment(mode, Path(tmp) / "run", n)
    print(json.dumps({"peak_rss": _peak_rss()}))


def _peak_rss() -> int:
    """This process's RSS high-water mark in bytes.

    VmHWM, not `getrusage().ru_maxrss`: Linux keeps ru_maxrss across fork + exec, so a child
    of a big parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB or B


def measure_memory(workload: str, quick: bool) -> dict[str, int]:
    out = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--memory-child", workload, mode]
        cmd += ["--threads", str(torch.get_num_threads())]
        cmd += ["--quick"] if quick else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss"]
    return out


def _top(profiler: cProfile.Profile, pattern: str, n: int, sort: str) -> list[str]:
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(sort).print_stats(pattern, n)
    lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return lines[start:]


def profile_workload(w: Workload, root: Path, mode: str, steps: int) -> str:
    """cProfile of both threads in one recorded segment: the training thread (hooks) and the
    writer thread (profiled from inside, since cProfile sees one thread only)."""
    import chisel.store.writer as writer_module

    writer_profile = cProfile.Profile(time.thread_time)  # CPU time: queue waits do not count
    original = writer_module.RunWriter._loop

    def profiled_loop(self):
        writer_profile.enable()
        try:
            original(self)
        finally:
            writer_profile.disable()

    trainer = Trainer(w)
    trainer.segment(mode, root / f"prof-warm-{w.name}-{mode}", 2)
    plain = trainer.segment("plain", root / "unused", steps)[0]
    writer_module.RunWriter._loop = profiled_loop  # type: ignore[method-assign]
    profiler = cProfile.Profile()
    try:
        t0 = time.perf_counter()
        profiler.enable()
        trainer.segment(mode, root / f"prof-{w.name}-{mode}", steps)
        profiler.disable()
        wall = time.perf_counter() - t0
    finally:
        writer_module.RunWriter._loop = original  # type: ignore[method-assign]
    writer_busy = pstats.Stats(writer_profile).total_tt
    head = (
        f"[{w.name}] profile of {mode} mode, {steps} steps: {1e3 * wall / steps:.2f} ms/step "
        f"(plain {1e3 * plain / steps:.2f} ms/step, unprofiled); writer thread CPU "
        f"{1e3 * writer_busy / steps:.2f} ms/step"
    )
    return "\n".join(
        [
            head,
            "  training thread, chisel functions by cumulative time:",
            *_top(profiler, r"chisel/(capture|store|recorder)", 14, "cumulative"),
            "  writer thread (CPU time), by internal time:",
            *_top(writer_profile, "", 12, "tottime"),
        ]
    )


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def memory_bound(t: dict, mode: str) -> float:
    """docs/recording.md: (queue_size + 2) step packets + θ + one keyframe (θ + Adam's two
    moments), + 4 θ that glibc's default allocator may keep of freed keyframe copies."""
    theta = t["param_bytes"]
    return (QUEUE_SIZE + 2) * t["bytes_per_step"][mode] + theta + 3 * theta + 4 * theta


def report(name: str, t: dict, mem: dict[str, int] | None, threads: int) -> list[str]:
    steps = t["steps"]
    plain, plain_cpu = t["loop"]["plain"], t["cpu"]["plain"]
    lines = [
        f"[{name}, {threads} torch thread{'s' if threads > 1 else ''}] {t['params']:,} params "
        f"({_mb(t['param_bytes'])}), {steps} steps × {t['repeats']} repeats per mode, alternating",
        f"  plain    median {1e3 * plain / steps:8.2f} ms/step, CPU {1e3 * plain_cpu / steps:.2f} ms/step",
    ]
    for mode in RECORDED:
        ratio = t["loop"][mode] / plain
        ratio_total = t["total"][mode] / t["total"]["plain"]
        lo, hi = (s / plain for s in t["spread"][mode])
        target = TARGETS[threads][mode] if threads in TARGETS else None
        verdict = "" if target is None else f"target <= {target:.2f}x {'ok' if ratio <= target else 'MISSED'}"
        extra = (t["cpu"][mode] - plain_cpu) / plain_cpu
        cpu_verdict = "ok" if extra <= CPU_TARGET else "MISSED"
        lines.append(
            f"  {mode:8} median {1e3 * t['loop'][mode] / steps:8.2f} ms/step  "
            f"ratio {ratio:5.2f}x (range {lo:.2f}-{hi:.2f}; with close() {ratio_total:.2f}x) {verdict}; "
            f"extra CPU {1e3 * (t['cpu'][mode] - plain_cpu) / steps:+.2f} ms/step = {100 * extra:+.0f}% "
            f"of the step's (target <= {100 * CPU_TARGET:.0f}% {cpu_verdict})  "
            f"[{_mb(t['bytes_per_step'][mode])} on disk per step]"
        )
        train, writer, files = (1e3 * x / steps for x in t["threads"][mode])
        lines.append(
            f"  {'':8} thread CPU per step: training {train:.2f} ms "
            f"({train - 1e3 * t['threads']['plain'][0] / steps:+.2f} over plain), "
            f"writer {writer:.2f} ms, file thread {files:.2f} ms"
        )
    if mem is not None:
        for mode in RECORDED:
            extra_mem = mem[mode] - mem["plain"]
            bound = memory_bound(t, mode)
            verdict = "ok" if extra_mem <= bound else "MISSED"
            lines.append(
                f"  memory {mode:8} peak RSS +{_mb(extra_mem)} over plain "
                f"({extra_mem / t['param_bytes']:.1f}x param bytes); bound "
                f"{bound / t['param_bytes']:.1f}x = {_mb(bound)} {verdict}"
            )
    return lines


def run_threads(args: argparse.Namespace, threads: int) -> None:
    """Every workload at one torch-thread setting, in this process."""
    torch.set_num_threads(threads)
    print(f"--- {threads} torch thread(s); load average {os.getloadavg()[0]:.1f}", flush=True)
    # numpy's BLAS is unused by the writer (its norms are einsum loops): no pool of its own
    with tempfile.TemporaryDirectory(prefix="chisel-bench-") as tmp:
        root = Path(tmp)
        for name in args.workloads.split(","):
            w = WORKLOADS[name]
            timing = time_workload(w, root, args.quick)
            mem = None if args.no_memory or threads != 1 else measure_memory(name, args.quick)
            print("\n".join(report(name, timing, mem, threads)), flush=True)
        if args.profile:
            for name in args.workloads.split(","):
                w = WORKLOADS[name]
                for mode in ("deltas", "factors"):
                    print(profile_workload(w, root, mode, w.steps), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 steps × 2 repeats: a smoke run")
    parser.add_argument("--profile", action="store_true", help="cProfile deltas and factors modes")
    parser.add_argument("--no-memory", action="store_true", help="skip the RSS subprocesses")
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--workloads", default="small,mlp,large", help="comma-separated: small,mlp,large"
    )
    parser.add_argument(
        "--threads", default="1,2", help="torch thread settings, each in its own subprocess"
    )
    args = parser.parse_args()
    settings = [int(n) for n in args.threads.split(",")]
    if args.memory_child:
        torch.set_num_threads(settings[0])
        memory_child(*args.memory_child, args.quick)
        return
    if args.in_process:
        run_threads(args, settings[0])
        return
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; chisel writes with O_DIRECT where the file system allows",
        flush=True,
    )
    for threads in settings:  # a fresh process per setting: torch's pools start clean
        cmd = [sys.executable, __file__, "--in-process", "--threads", str(threads)]
        cmd += ["--workloads", args.workloads]
        cmd += [flag for flag in ("--quick", "--profile", "--no-memory") if getattr(args, flag[2:].replace("-", "_"))]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
