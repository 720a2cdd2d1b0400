"""Bytes per recorded step, by storage mode, for a CleanRL-CartPole-sized agent; and the cost of
the CRC32 checksums of step files.

Prints, for each mode, the measured bytes per step of a 200-step recording and the projected size
of a 20,000-update run. Usage: python benchmarks/storage.py

`python benchmarks/storage.py --checksums [--threads 1 2]` measures, in one process, the time of
writing step files, of a whole recording loop, and of reading every update, gradient and factor
back, with checksums vs without (write: checksums replaced by a constant; read: verify=False), as
ratios (median of interleaved repeats), on a 256-256 MLP with factors on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import chisel

MODES = {
    "float32 (default)": {},
    "float32, factors": {"factors": True},
    "bfloat16, no grads": {"dtype": "bfloat16", "grads": False},
    "bfloat16, no grads, bf16 factors": {
        "dtype": "bfloat16", "grads": False, "factors": True, "factor_dtype": "bfloat16"
    },
    "bfloat16, grads, bf16 factors": {"dtype": "bfloat16", "factors": True, "factor_dtype": "bfloat16"},
}


class Agent(nn.Module):
    """CleanRL's CartPole PPO agent: separate 64-64 tanh actor and critic (9,155 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        self.actor = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))


def measure(root: Path, name: str, options: dict, steps: int = 200, batch: int = 128) -> float:
    torch.manual_seed(0)
    agent = Agent()
    optimizer = torch.optim.Adam(agent.parameters(), lr=2.5e-4, eps=1e-5)
    run_dir = root / name.replace(" ", "_").replace(",", "")
    with chisel.record(agent, optimizer, run_dir, keyframe_every=1000, **options):
        for _ in range(steps):
            obs = torch.randn(batch, 4)
            loss = agent.actor(obs).logsumexp(-1).mean() + agent.critic(obs).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    run = chisel.load(run_dir)
    steps_bytes = sum(f.stat().st_size for f in (run_dir / "steps").iterdir())
    return steps_bytes / len(run)


class Wide(nn.Module):
    """A 64-256-256-4 MLP (83k parameters): step files of ~1 MB with grads and factors."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _record_loop(run_dir: Path, steps: int, batch: int = 256) -> float:
    torch.manual_seed(0)
    model = Wide()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    with chisel.record(model, optimizer, run_dir, factors=True, keyframe_every=50, overwrite=True):
        for _ in range(steps):
            model(torch.randn(batch, 64)).logsumexp(-1).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    return time.perf_counter() - start


def _read_all(run_dir: Path, verify: bool) -> float:
    start = time.perf_counter()
    run = chisel.load(run_dir, verify=verify)
    for t in range(len(run)):
        run.update(t), run.grads(t), run.factors(t)
    return time.perf_counter() - start


def _write_files(root: Path, tensors: dict, n: int) -> float:
    from chisel.store.layout import write_tensors

    start = time.perf_counter()
    for i in range(n):
        write_tensors(root / f"{i:09d}.safetensors", tensors, {"step": i})
    return time.perf_counter() - start


def checksum_cost(threads: int, repeats: int = 5, steps: int = 100) -> None:
    """Ratios with/without checksums: file writes, the recording loop, reading a run back."""
    from chisel.store import layout

    torch.set_num_threads(threads)
    real = layout.checksum
    ratios: dict[str, list[float]] = {"write step files": [], "recording loop": [], "read run": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _record_loop(root / "run", steps)
        first = root / "run" / "steps" / "000000001.safetensors"
        from safetensors.torch import load_file

        tensors = load_file(str(first))
        mb = first.stat().st_size / 2**20
        (root / "w").mkdir()
        for _ in range(repeats):
            timed = {}
            for on in (True, False):
                layout.checksum = real if on else (lambda t: 0)
                try:
                    timed[on] = (
                        _write_files(root / "w", tensors, 50),
                        _record_loop(root / f"loop{on}", steps),
                    )
                finally:
                    layout.checksum = real
            ratios["write step files"].append(timed[True][0] / timed[False][0])
            ratios["recording loop"].append(timed[True][1] / timed[False][1])
            ratios["read run"].append(_read_all(root / "run", True) / _read_all(root / "run", False))
    print(f"threads={threads}, step file {mb:.2f} MB, {steps} steps, {repeats} interleaved repeats")
    for name, values in ratios.items():
        print(f"  {name:18s} with/without checksums: {statistics.median(values):.3f}x "
              f"(range {min(values):.3f}-{max(values):.3f})")


def main() -> None:
    n_params = sum(p.numel() for p in Agent().parameters())
    print(f"agent: {n_params:,} parameters, minibatch 128, Adam")
    print(f"{'mode':36s} {'bytes/step':>11s} {'20k updates':>12s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in MODES.items():
            per_step = measure(Path(tmp), name, options)
            print(f"{name:36s} {per_step:11,.0f} {per_step * 20000 / 2**20:9,.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--checksums", action="store_true", help="measure the checksum cost")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if args.checksums:
        for n in args.threads:
            checksum_cost(n)
    else:
        main()
